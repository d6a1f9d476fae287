//! `sluice lab image`: the image `manifests/sluice.yaml` names, written offline by sluice itself
//! (no registry, no Docker daemon) as a docker-archive tarball that `ctr images import` and
//! `sluice lab load` take. Its one layer holds this binary as `/usr/local/bin/sluice` and the
//! netfilter tools the agent runs (nft, iptables and ip6tables in their nft and legacy
//! variants, ipset, conntrack) exactly as the machine's packages install them (their symlinks,
//! Debian's `/etc/alternatives` and merged `/usr` included), with every shared library they load
//! (their `DT_NEEDED`, found along the ld.so search path, and the dynamic loader) and iptables'
//! extension modules. The output is deterministic: sorted entries, owner root, mtime 0, so one
//! binary and one set of packages give one digest.
//!
//! Deciding (which files, at which paths: [`plan_rootfs`]; the JSON documents) is separate from
//! writing ([`write_archive`]).

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Where the binary lives in the image (the DaemonSet's `command` and the Dockerfile's ENTRYPOINT).
pub const BINARY_PATH: &str = "usr/local/bin/sluice";

/// A tool the image carries: its name, the Debian package that ships it (for the message when
/// it is missing) and whether the image is refused without it.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: std::borrow::Cow<'static, str>,
    pub package: &'static str,
    pub required: bool,
}

const fn tool(name: &'static str, package: &'static str, required: bool) -> Tool {
    Tool {
        name: std::borrow::Cow::Borrowed(name),
        package,
        required,
    }
}

/// The image's tools: [`TOOLS`] and the `extra` ones a user asked for (`lab image --tool`,
/// e.g. iperf3 for a test's pods), each required.
pub fn tools_with(extra: &[String]) -> Vec<Tool> {
    TOOLS
        .iter()
        .cloned()
        .chain(extra.iter().map(|name| Tool {
            name: std::borrow::Cow::Owned(name.clone()),
            package: "",
            required: true,
        }))
        .collect()
}

/// The tools the agent runs, looked up in [`TOOL_DIRS`] of the source root. Required: what the
/// agent cannot work without; the rest (the explicit nft and legacy variants, which the agent
/// prefers when it detects the host's iptables mode, and ip6tables) come along where the
/// packages have them.
pub const TOOLS: &[Tool] = &[
    tool("nft", "nftables", true),
    tool("iptables", "iptables", true),
    tool("iptables-save", "iptables", true),
    tool("iptables-restore", "iptables", true),
    tool("ipset", "ipset", true),
    tool("conntrack", "conntrack", true),
    tool("iptables-nft", "iptables", false),
    tool("iptables-nft-save", "iptables", false),
    tool("iptables-nft-restore", "iptables", false),
    tool("iptables-legacy", "iptables", false),
    tool("iptables-legacy-save", "iptables", false),
    tool("iptables-legacy-restore", "iptables", false),
    tool("ip6tables", "iptables", false),
    tool("ip6tables-save", "iptables", false),
    tool("ip6tables-restore", "iptables", false),
    // The iptables policy backend's IPv6 guard runs these, per detected mode.
    tool("ip6tables-nft", "iptables", false),
    tool("ip6tables-nft-restore", "iptables", false),
    tool("ip6tables-legacy", "iptables", false),
    tool("ip6tables-legacy-restore", "iptables", false),
];

/// Where tools are looked for (and kept, at the same path, in the image).
pub const TOOL_DIRS: &[&str] = &["usr/sbin", "usr/bin", "sbin", "bin"];

/// glibc's own library directories, searched after those of `/etc/ld.so.conf`.
const DEFAULT_LIB_DIRS: &[&str] = &["lib64", "usr/lib64", "lib", "usr/lib"];

/// Directories the runtime mounts over or a tool may write to; empty in the image.
const EMPTY_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("etc", 0o755),
    ("proc", 0o555),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
];

/// A symlink chain longer than this is a loop (Linux's own limit).
const MAX_SYMLINKS: usize = 40;

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// The manifest the image is for: its DaemonSet's `image:` is the default tag.
/// Embedded, so that `lab up --kubernetes` installs sluice from it outside the repository too.
pub const MANIFEST: &str = include_str!("../../../manifests/sluice.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{tool} not found in {dirs} under {root}{package}")]
    MissingTool {
        tool: String,
        package: String,
        dirs: String,
        root: String,
    },
    #[error("{file} needs {library}, which is in none of {dirs} under {root}")]
    MissingLibrary {
        file: String,
        library: String,
        dirs: String,
        root: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an ELF file sluice can read: {reason}")]
    Elf { path: String, reason: String },
    #[error("{path}: more than {MAX_SYMLINKS} symlinks (a loop?)")]
    SymlinkLoop { path: String },
    #[error("{path}: neither a file, a directory nor a symlink")]
    Unsupported { path: String },
    #[error("no iptables extension directory (xtables) in any of {dirs} under {root}")]
    NoXtables { dirs: String, root: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The `image:` the manifest's DaemonSet runs (every container of it runs the same one).
pub fn manifest_image() -> &'static str {
    MANIFEST
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(str::trim)
        .next()
        .unwrap_or("ghcr.io/sluice-net/sluice:latest")
}

/// One entry of the layer, at a path relative to the image's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    /// Copied from `source` (a path on this machine).
    File {
        source: PathBuf,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
}

/// What an ELF file asks of the dynamic linker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// `PT_INTERP`: the dynamic loader, an absolute path.
    pub interpreter: Option<PathBuf>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<String>,
}

/// `PT_INTERP` and `DT_NEEDED` of an ELF file's bytes; `None` when they are not ELF (a script).
pub fn elf_deps(data: &[u8]) -> Result<Option<ElfDeps>, String> {
    use object::elf::{DT_NEEDED, ELFCLASS64};
    use object::read::elf::{ElfFile, FileHeader, ProgramHeader};
    if !data.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    fn read<Elf: FileHeader<Endian = object::Endianness>>(data: &[u8]) -> Result<ElfDeps, String> {
        let file = ElfFile::<Elf>::parse(data).map_err(|e| e.to_string())?;
        let endian = file.endian();
        let mut deps = ElfDeps::default();
        for ph in file.elf_program_headers() {
            if let Some(interp) = ph.interpreter(endian, data).map_err(|e| e.to_string())? {
                deps.interpreter = Some(PathBuf::from(String::from_utf8_lossy(interp).as_ref()));
            }
        }
        let table = file.elf_dynamic_table().map_err(|e| e.to_string())?;
        for d in &table {
            if d.tag == DT_NEEDED {
                let name = table.string(d).map_err(|e| e.to_string())?;
                deps.needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
        Ok(deps)
    }
    let deps = if data.get(4) == Some(&ELFCLASS64) {
        read::<object::elf::FileHeader64<object::Endianness>>(data)?
    } else {
        read::<object::elf::FileHeader32<object::Endianness>>(data)?
    };
    Ok(Some(deps))
}

/// [`elf_deps`] of a file on this machine.
pub fn file_deps(path: &Path) -> Result<Option<ElfDeps>, ImageError> {
    let data = std::fs::read(path).map_err(io_err(path))?;
    elf_deps(&data).map_err(|reason| ImageError::Elf {
        path: path.display().to_string(),
        reason,
    })
}

/// The library search path of the source root: the directories of its `/etc/ld.so.conf`
/// (following `include` globs of the form `DIR/*.conf`), then glibc's defaults; relative to the
/// root, without duplicates.
pub fn ld_paths(root: &Path) -> Vec<PathBuf> {
    fn read_conf(root: &Path, file: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(text) = std::fs::read_to_string(root.join(relative(file))) else {
            return;
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if let Some(pattern) = line.strip_prefix("include") {
                if depth > 4 {
                    continue;
                }
                let pattern = Path::new(pattern.trim());
                let (dir, glob) = match (pattern.parent(), pattern.file_name()) {
                    (Some(d), Some(g)) => (d, g.to_string_lossy().into_owned()),
                    _ => continue,
                };
                let (prefix, suffix) = glob.split_once('*').unwrap_or((&glob, ""));
                let Ok(entries) = std::fs::read_dir(root.join(relative(dir))) else {
                    continue;
                };
                let mut files: Vec<String> = entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| {
                        n.starts_with(prefix) && n.ends_with(suffix) && n.len() >= glob.len() - 1
                    })
                    .collect();
                files.sort();
                for f in files {
                    read_conf(root, &dir.join(f), depth + 1, out);
                }
            } else if line.starts_with('/') {
                out.push(relative(Path::new(line)));
            }
        }
    }
    let mut dirs = Vec::new();
    read_conf(root, Path::new("/etc/ld.so.conf"), 0, &mut dirs);
    dirs.extend(DEFAULT_LIB_DIRS.iter().map(PathBuf::from));
    let mut seen = BTreeSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// `/a/b` → `a/b` (image paths are relative to the image's root).
fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| format!("/{}", d.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The files of the layer, keyed by their path in the image.
#[derive(Debug, Default)]
pub struct Rootfs {
    pub entries: BTreeMap<PathBuf, Entry>,
}

impl Rootfs {
    fn dir(&mut self, path: &Path, mode: u32) {
        for ancestor in path.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            self.entries
                .entry(ancestor.to_path_buf())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
        self.entries.insert(path.to_path_buf(), Entry::Dir { mode });
    }

    fn put(&mut self, path: &Path, entry: Entry) {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !self.entries.contains_key(parent) {
                self.dir(parent, 0o755);
            }
        }
        self.entries.insert(path.to_path_buf(), entry);
    }

    /// Copies `path` of the source `root` into the image at the same path, with every symlink
    /// met on the way (in a directory component too, as merged /usr's `/lib -> usr/lib`), and
    /// returns the real path (relative, in `root` and in the image) of what it names.
    fn copy(&mut self, root: &Path, path: &Path) -> Result<PathBuf, ImageError> {
        let mut pending: VecDeque<PathBuf> = path
            .components()
            .map(|c| PathBuf::from(c.as_os_str()))
            .collect();
        let mut resolved = PathBuf::new();
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            match Path::new(&part).components().next() {
                None | Some(Component::RootDir | Component::CurDir | Component::Prefix(_)) => {
                    continue
                }
                Some(Component::ParentDir) => {
                    resolved.pop();
                    continue;
                }
                Some(Component::Normal(_)) => {}
            }
            let here = resolved.join(&part);
            let host = root.join(&here);
            let meta = std::fs::symlink_metadata(&host).map_err(io_err(&host))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ImageError::SymlinkLoop {
                        path: path.display().to_string(),
                    });
                }
                let target = std::fs::read_link(&host).map_err(io_err(&host))?;
                self.put(
                    &here,
                    Entry::Symlink {
                        target: target.clone(),
                    },
                );
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    pending.push_front(PathBuf::from(c.as_os_str()));
                }
            } else if kind.is_dir() {
                // Directories are 0755 whatever the order they are met in (deterministic).
                if !matches!(self.entries.get(&here), Some(Entry::Dir { .. })) {
                    self.dir(&here, 0o755);
                }
                resolved = here;
            } else if kind.is_file() && pending.is_empty() {
                self.put(
                    &here,
                    Entry::File {
                        source: host,
                        mode: mode_of(&meta),
                    },
                );
                resolved = here;
            } else {
                return Err(ImageError::Unsupported {
                    path: host.display().to_string(),
                });
            }
        }
        Ok(resolved)
    }
}

fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

/// Decides the image's file tree: `binary` (a file on this machine) as
/// `/usr/local/bin/sluice`, `tools` found in [`TOOL_DIRS`] of `root`, iptables' extension
/// modules, and the closure of what they load, all taken from `root` at their own paths.
/// `deps` reads an ELF file's needs ([`file_deps`] for real files).
pub fn plan_rootfs(
    root: &Path,
    binary: &Path,
    tools: &[Tool],
    deps: &dyn Fn(&Path) -> Result<Option<ElfDeps>, ImageError>,
) -> Result<Rootfs, ImageError> {
    let mut fs = Rootfs::default();
    for (dir, mode) in EMPTY_DIRS {
        fs.dir(Path::new(dir), *mode);
    }
    fs.put(
        Path::new(BINARY_PATH),
        Entry::File {
            source: binary.to_path_buf(),
            mode: 0o755,
        },
    );
    // Files (host paths) whose needs are still to be read.
    let mut queue: VecDeque<PathBuf> = VecDeque::from([binary.to_path_buf()]);
    for t in tools {
        let found = TOOL_DIRS
            .iter()
            .map(|d| Path::new(d).join(&*t.name))
            .find(|p| std::fs::symlink_metadata(root.join(p)).is_ok());
        let Some(path) = found else {
            if !t.required {
                continue;
            }
            return Err(ImageError::MissingTool {
                tool: t.name.to_string(),
                package: if t.package.is_empty() {
                    String::new()
                } else {
                    format!(" (Debian ships it in package {})", t.package)
                },
                dirs: TOOL_DIRS
                    .iter()
                    .map(|d| format!("/{d}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                root: root.display().to_string(),
            });
        };
        let real = fs.copy(root, &path)?;
        queue.push_back(root.join(real));
    }
    let lib_dirs = ld_paths(root);
    // iptables loads its matches and targets (libxt_*.so, ...) from `LIBDIR/xtables`.
    if tools.iter().any(|t| t.name.starts_with("iptables")) {
        let xtables: Vec<PathBuf> = lib_dirs
            .iter()
            .map(|d| d.join("xtables"))
            .filter(|d| root.join(d).is_dir())
            .collect();
        if xtables.is_empty() {
            return Err(ImageError::NoXtables {
                dirs: display_dirs(&lib_dirs),
                root: root.display().to_string(),
            });
        }
        for dir in xtables {
            let host = root.join(&dir);
            let mut names: Vec<_> = std::fs::read_dir(&host)
                .map_err(io_err(&host))?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort();
            for name in names {
                let real = fs.copy(root, &dir.join(name))?;
                if root.join(&real).is_file() {
                    queue.push_back(root.join(real));
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    while let Some(file) = queue.pop_front() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let Some(needs) = deps(&file)? else {
            continue;
        };
        if let Some(interp) = needs.interpreter {
            let real = fs.copy(root, &interp)?;
            queue.push_back(root.join(real));
        }
        for library in needs.needed {
            let path = if library.contains('/') {
                Some(PathBuf::from(&library))
            } else {
                lib_dirs
                    .iter()
                    .map(|d| d.join(&library))
                    .find(|p| root.join(p).exists())
            };
            let Some(path) = path else {
                return Err(ImageError::MissingLibrary {
                    file: file.display().to_string(),
                    library,
                    dirs: display_dirs(&lib_dirs),
                    root: root.display().to_string(),
                });
            };
            let real = fs.copy(root, &path)?;
            queue.push_back(root.join(real));
        }
    }
    Ok(fs)
}

/// The image's architecture as OCI names it.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

/// The image config (the Docker/OCI image JSON) for a one-layer image whose uncompressed layer
/// has `diff_id` (`sha256:...`).
pub fn image_config(diff_id: &str, version: &str) -> serde_json::Value {
    serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "created": EPOCH,
        "config": {
            "Entrypoint": [format!("/{BINARY_PATH}")],
            "Env": [PATH_ENV],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "sluice",
                "org.opencontainers.image.version": version,
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": EPOCH, "created_by": "sluice lab image" }],
    })
}

/// `manifest.json` of a docker-archive (what `docker save` writes, `docker load` and
/// `ctr images import` read).
pub fn docker_manifest(config_file: &str, tag: &str, layer_file: &str) -> serde_json::Value {
    serde_json::json!([{ "Config": config_file, "RepoTags": [tag], "Layers": [layer_file] }])
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    // Both are ASCII and short: these cannot fail.
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the layer (an uncompressed tar of `fs`) to `out`; returns its sha256 (hex).
pub fn write_layer(fs: &Rootfs, out: impl Write) -> Result<String, ImageError> {
    let here = Path::new("layer");
    let mut tar = tar::Builder::new(Hashing {
        inner: out,
        hash: Sha256::new(),
    });
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, entry) in &fs.entries {
        match entry {
            Entry::Dir { mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                tar.append_data(&mut h, path, std::io::empty())
                    .map_err(io_err(path))?;
            }
            Entry::Symlink { target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut h, path, target)
                    .map_err(io_err(path))?;
            }
            Entry::File { source, mode } => {
                let file = std::fs::File::open(source).map_err(io_err(source))?;
                let size = file.metadata().map_err(io_err(source))?.len();
                let mut h = header(tar::EntryType::Regular, *mode, size);
                tar.append_data(&mut h, path, file)
                    .map_err(io_err(source))?;
            }
        }
    }
    let hashing = tar.into_inner().map_err(io_err(here))?;
    Ok(hex(&hashing.hash.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`write_archive`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The image ID: `sha256:` of the config, as `ctr images ls` and the kubelet show it.
    pub id: String,
    pub layer_digest: String,
    pub layer_bytes: u64,
    pub files: usize,
}

/// Removes a file on drop unless disarmed: nothing half-written is left behind on an error.
struct Removing(PathBuf, bool);

impl Drop for Removing {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Writes the docker-archive of `fs` tagged `tag` to `out` (through temporary files beside it,
/// renamed into place at the end).
pub fn write_archive(
    fs: &Rootfs,
    tag: &str,
    version: &str,
    out: &Path,
) -> Result<Written, ImageError> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.tar".into());
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let layer_path = dir.join(format!(".{name}.layer.tmp"));
    let tmp_path = dir.join(format!(".{name}.tmp"));
    let _layer_guard = Removing(layer_path.clone(), true);
    let mut tmp_guard = Removing(tmp_path.clone(), true);
    let layer_file = std::fs::File::create(&layer_path).map_err(io_err(&layer_path))?;
    let mut layer_out = std::io::BufWriter::new(layer_file);
    let layer_sha = write_layer(fs, &mut layer_out)?;
    layer_out
        .into_inner()
        .map_err(|e| io_err(&layer_path)(e.into_error()))?
        .sync_all()
        .map_err(io_err(&layer_path))?;
    let layer_bytes = std::fs::metadata(&layer_path)
        .map_err(io_err(&layer_path))?
        .len();
    let config = serde_json::to_vec(&image_config(&format!("sha256:{layer_sha}"), version))
        .unwrap_or_default();
    let config_sha = hex(&Sha256::digest(&config));
    let config_file = format!("{config_sha}.json");
    let layer_file = format!("{layer_sha}/layer.tar");
    let manifest =
        serde_json::to_vec(&docker_manifest(&config_file, tag, &layer_file)).unwrap_or_default();
    let file = std::fs::File::create(&tmp_path).map_err(io_err(&tmp_path))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let put = |tar: &mut tar::Builder<_>, path: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        tar.append_data(&mut h, path, data).map_err(io_err(out))
    };
    put(&mut tar, "manifest.json", &manifest)?;
    put(&mut tar, &config_file, &config)?;
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, format!("{layer_sha}/"), std::io::empty())
        .map_err(io_err(out))?;
    let layer = std::fs::File::open(&layer_path).map_err(io_err(&layer_path))?;
    let mut h = header(tar::EntryType::Regular, 0o644, layer_bytes);
    tar.append_data(&mut h, &layer_file, layer)
        .map_err(io_err(&layer_path))?;
    tar.into_inner()
        .map_err(io_err(out))?
        .into_inner()
        .map_err(|e| io_err(out)(e.into_error()))?
        .sync_all()
        .map_err(io_err(out))?;
    std::fs::rename(&tmp_path, out).map_err(io_err(out))?;
    tmp_guard.1 = false;
    Ok(Written {
        id: format!("sha256:{config_sha}"),
        layer_digest: format!("sha256:{layer_sha}"),
        layer_bytes,
        files: fs
            .entries
            .values()
            .filter(|e| matches!(e, Entry::File { .. }))
            .count(),
    })
}

/// Plans the tree from `root` (the tools, their libraries) with `binary` (default: this
/// executable) and writes the archive tagged `tag` to `out`. What `lab image` runs, and what a
/// lab that installs sluice from its manifest calls to make the image itself.
pub fn build(
    out: &Path,
    tag: &str,
    binary: Option<&Path>,
    root: &Path,
    extra: &[String],
) -> anyhow::Result<Written> {
    use anyhow::Context;
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe().context("finding the sluice executable")?,
    };
    let fs = plan_rootfs(root, &binary, &tools_with(extra), &file_deps)?;
    Ok(write_archive(&fs, tag, env!("CARGO_PKG_VERSION"), out)?)
}

/// `sluice lab image`.
pub fn run(
    out: &Path,
    tag: &str,
    binary: Option<&Path>,
    root: &Path,
    extra: &[String],
) -> anyhow::Result<()> {
    let w = build(out, tag, binary, root, extra)?;
    eprintln!(
        "image {tag}: {} files, layer {} ({:.1} MiB), id {}",
        w.files,
        w.layer_digest,
        w.layer_bytes as f64 / 1048576.0,
        w.id
    );
    println!("{}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::symlink;

    /// A Debian-like tree: merged /usr, an alternatives link, a versioned library chain.
    fn fake_root(dir: &Path) {
        let mk = |p: &str, body: &str| {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        mk("usr/sbin/xtables-nft-multi", "multi");
        mk("usr/sbin/nft", "nft");
        mk("usr/lib/x86_64-linux-gnu/libc.so.6", "libc");
        mk("usr/lib/x86_64-linux-gnu/libnftnl.so.11.6.0", "nftnl");
        mk("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "ld");
        mk("usr/lib/x86_64-linux-gnu/xtables/libxt_tcp.so", "xt_tcp");
        mk("usr/local/lib/libonlyhere.so.1", "onlyhere");
        mk("etc/alternatives/.keep", "");
        mk(
            "etc/ld.so.conf",
            "# comment\ninclude /etc/ld.so.conf.d/*.conf\n/usr/local/lib\n",
        );
        mk(
            "etc/ld.so.conf.d/x86_64-linux-gnu.conf",
            "/usr/local/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n",
        );
        mk("etc/ld.so.conf.d/ignored.txt", "/nowhere\n");
        let ln = |target: &str, at: &str| symlink(target, dir.join(at)).unwrap();
        ln("usr/lib", "lib");
        ln("usr/sbin", "sbin");
        std::fs::create_dir_all(dir.join("usr/lib64")).unwrap();
        ln("usr/lib64", "lib64");
        ln(
            "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "usr/lib64/ld-linux-x86-64.so.2",
        );
        ln("/etc/alternatives/iptables", "usr/sbin/iptables");
        ln("/usr/sbin/iptables-nft", "etc/alternatives/iptables");
        ln("xtables-nft-multi", "usr/sbin/iptables-nft");
        ln(
            "libnftnl.so.11.6.0",
            "usr/lib/x86_64-linux-gnu/libnftnl.so.11",
        );
        ln(
            "libxt_tcp.so",
            "usr/lib/x86_64-linux-gnu/xtables/libxt_udp.so",
        );
    }

    /// The needs of the fake tree's files, by file name.
    fn fake_deps(
        table: HashMap<&'static str, ElfDeps>,
    ) -> impl Fn(&Path) -> Result<Option<ElfDeps>, ImageError> {
        move |p: &Path| {
            let name = p.file_name().unwrap().to_str().unwrap();
            Ok(table.get(name).cloned())
        }
    }

    fn needs(interp: bool, libs: &[&str]) -> ElfDeps {
        ElfDeps {
            interpreter: interp.then(|| PathBuf::from("/lib64/ld-linux-x86-64.so.2")),
            needed: libs.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    fn symlink_at(fs: &Rootfs, p: &str) -> Option<String> {
        match fs.entries.get(Path::new(p)) {
            Some(Entry::Symlink { target }) => Some(target.display().to_string()),
            _ => None,
        }
    }

    fn is_file(fs: &Rootfs, p: &str) -> bool {
        matches!(fs.entries.get(Path::new(p)), Some(Entry::File { .. }))
    }

    #[test]
    fn ld_paths_follow_includes_then_glibc_defaults() {
        let t = tempfile::tempdir().unwrap();
        fake_root(t.path());
        let got: Vec<String> = ld_paths(t.path())
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "usr/local/lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu",
                "usr/lib/x86_64-linux-gnu",
                "usr/local/lib",
                "lib64",
                "usr/lib64",
                "lib",
                "usr/lib"
            ]
        );
    }

    #[test]
    fn tools_and_libraries_are_copied_with_every_symlink_on_their_way() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fake_root(root);
        let bin_dir = tempfile::tempdir().unwrap();
        let binary = bin_dir.path().join("sluice");
        std::fs::write(&binary, "sluice").unwrap();
        let deps = fake_deps(HashMap::from([
            ("sluice", needs(true, &["libc.so.6"])),
            (
                "xtables-nft-multi",
                needs(true, &["libnftnl.so.11", "libc.so.6"]),
            ),
            ("nft", needs(true, &["libonlyhere.so.1"])),
            ("libxt_tcp.so", needs(false, &["libc.so.6"])),
            ("libnftnl.so.11.6.0", needs(false, &["libc.so.6"])),
            ("libc.so.6", needs(false, &["ld-linux-x86-64.so.2"])),
            ("ld-linux-x86-64.so.2", needs(false, &[])),
        ]));
        let fs = plan_rootfs(
            root,
            &binary,
            &[
                tool("iptables", "iptables", true),
                tool("nft", "nftables", true),
                tool("iptables-legacy", "iptables", false),
            ],
            &deps,
        )
        .unwrap();
        // The binary, from outside the root, at the manifest's path.
        assert_eq!(
            fs.entries.get(Path::new(BINARY_PATH)),
            Some(&Entry::File {
                source: binary.clone(),
                mode: 0o755
            })
        );
        // iptables through /etc/alternatives to the multi-call binary, as Debian has it.
        assert_eq!(
            symlink_at(&fs, "usr/sbin/iptables").as_deref(),
            Some("/etc/alternatives/iptables")
        );
        assert_eq!(
            symlink_at(&fs, "etc/alternatives/iptables").as_deref(),
            Some("/usr/sbin/iptables-nft")
        );
        assert_eq!(
            symlink_at(&fs, "usr/sbin/iptables-nft").as_deref(),
            Some("xtables-nft-multi")
        );
        assert!(is_file(&fs, "usr/sbin/xtables-nft-multi"));
        assert!(is_file(&fs, "usr/sbin/nft"));
        // The loader through /lib64 (a merged-/usr symlink) and its relative link.
        assert_eq!(symlink_at(&fs, "lib64").as_deref(), Some("usr/lib64"));
        assert_eq!(
            symlink_at(&fs, "usr/lib64/ld-linux-x86-64.so.2").as_deref(),
            Some("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        );
        assert!(is_file(
            &fs,
            "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        ));
        // Libraries found along the search path in its order: /lib/x86_64-linux-gnu (via the
        // /lib symlink) comes before /usr/lib/x86_64-linux-gnu.
        assert_eq!(symlink_at(&fs, "lib").as_deref(), Some("usr/lib"));
        assert!(is_file(&fs, "usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(
            symlink_at(&fs, "usr/lib/x86_64-linux-gnu/libnftnl.so.11").as_deref(),
            Some("libnftnl.so.11.6.0")
        );
        assert!(is_file(&fs, "usr/lib/x86_64-linux-gnu/libnftnl.so.11.6.0"));
        assert!(is_file(&fs, "usr/local/lib/libonlyhere.so.1"));
        // iptables' modules, symlinks kept; their own needs read too.
        assert!(is_file(
            &fs,
            "usr/lib/x86_64-linux-gnu/xtables/libxt_tcp.so"
        ));
        assert_eq!(
            symlink_at(&fs, "usr/lib/x86_64-linux-gnu/xtables/libxt_udp.so").as_deref(),
            Some("libxt_tcp.so")
        );
        // Every parent is a directory (or the symlink itself), nothing outside what was asked.
        for path in fs.entries.keys() {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                assert!(
                    matches!(fs.entries.get(parent), Some(Entry::Dir { .. })),
                    "{path:?}: parent {parent:?} is no directory"
                );
            }
        }
        // An optional tool the tree lacks is left out, not an error.
        assert!(!fs
            .entries
            .contains_key(Path::new("usr/sbin/iptables-legacy")));
        assert!(!fs.entries.contains_key(Path::new("etc/ld.so.conf")));
        assert!(!fs.entries.contains_key(Path::new("etc/alternatives/.keep")));
        assert_eq!(
            fs.entries.get(Path::new("tmp")),
            Some(&Entry::Dir { mode: 0o1777 })
        );
    }

    #[test]
    fn a_missing_tool_or_library_is_named_with_where_it_was_looked_for() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fake_root(root);
        let binary = root.join("usr/sbin/nft");
        let none = fake_deps(HashMap::new());
        let err = plan_rootfs(
            root,
            &binary,
            &[tool("conntrack", "conntrack", true)],
            &none,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("conntrack not found in /usr/sbin, /usr/bin, /sbin, /bin"),
            "{msg}"
        );
        assert!(msg.contains("package conntrack"), "{msg}");
        // A tool asked for with `--tool` is required too, named without a package guess.
        let extra = tools_with(&["iperf3".to_string()]);
        assert_eq!(extra.len(), TOOLS.len() + 1);
        let err = plan_rootfs(root, &binary, &extra[TOOLS.len()..], &none).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("iperf3 not found in /usr/sbin, /usr/bin, /sbin, /bin")
                && !msg.contains("package"),
            "{msg}"
        );
        let deps = fake_deps(HashMap::from([("nft", needs(false, &["libjansson.so.4"]))]));
        let err = plan_rootfs(root, &binary, &[tool("nft", "nftables", true)], &deps).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("needs libjansson.so.4"), "{msg}");
        assert!(msg.contains("/usr/lib/x86_64-linux-gnu"), "{msg}");
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_a_hang() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        symlink("b", root.join("usr/sbin/nft")).unwrap();
        symlink("nft", root.join("usr/sbin/b")).unwrap();
        let none = fake_deps(HashMap::new());
        let err = plan_rootfs(
            root,
            &root.join("x"),
            &[tool("nft", "nftables", true)],
            &none,
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::SymlinkLoop { .. }), "{err}");
    }

    #[test]
    fn elf_needs_are_read_from_a_real_binary() {
        // This test binary is a dynamic executable of the host's toolchain.
        let me = std::env::current_exe().unwrap();
        let deps = file_deps(&me).unwrap().expect("an ELF file");
        assert!(
            deps.interpreter
                .as_ref()
                .is_some_and(|i| i.to_string_lossy().contains("ld-linux")),
            "{deps:?}"
        );
        assert!(
            deps.needed.iter().any(|n| n.starts_with("libc.so")),
            "{deps:?}"
        );
        assert_eq!(elf_deps(b"#!/bin/sh\necho\n").unwrap(), None);
        assert!(elf_deps(b"\x7fELF\x02garbage").is_err());
    }

    #[test]
    fn a_static_binary_needs_nothing() {
        // The shipped binary is static (musl): no loader, no library. Debian's busybox-static
        // (README's test packages) is one at hand.
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI installs busybox-static"
            );
            eprintln!("skipping: /bin/busybox (busybox-static) is not installed");
            return;
        }
        assert_eq!(file_deps(busybox).unwrap(), Some(ElfDeps::default()));
    }

    #[test]
    fn config_and_manifest_are_what_docker_save_writes() {
        let config = image_config("sha256:abc", "0.1.0");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], oci_arch());
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/sluice");
        assert!(config["config"]["Cmd"].is_null());
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["rootfs"]["diff_ids"][0], "sha256:abc");
        assert_eq!(config["created"], EPOCH);
        let m = docker_manifest("c.json", "ghcr.io/x/y:v1", "l/layer.tar");
        assert_eq!(
            m,
            serde_json::json!([{"Config": "c.json", "RepoTags": ["ghcr.io/x/y:v1"], "Layers": ["l/layer.tar"]}])
        );
    }

    #[test]
    fn the_default_tag_is_the_image_every_container_of_the_manifest_runs() {
        let images: BTreeSet<&str> = MANIFEST
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image:"))
            .map(str::trim)
            .collect();
        assert_eq!(images.len(), 1, "{images:?}");
        assert_eq!(images.first().copied(), Some(manifest_image()));
        assert!(manifest_image().contains(':'));
    }

    #[test]
    fn the_layer_is_deterministic_and_lists_entries_in_order() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fake_root(root);
        let deps = fake_deps(HashMap::new());
        let binary = root.join("usr/sbin/nft");
        let fs = plan_rootfs(root, &binary, &[tool("iptables", "iptables", true)], &deps).unwrap();
        let mut a = Vec::new();
        let sha_a = write_layer(&fs, &mut a).unwrap();
        // Touching a source's mtime changes nothing.
        let f = std::fs::File::options()
            .write(true)
            .open(root.join("usr/sbin/xtables-nft-multi"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now()).unwrap();
        let mut b = Vec::new();
        let sha_b = write_layer(&fs, &mut b).unwrap();
        assert_eq!(sha_a, sha_b);
        assert_eq!(a, b);
        assert_eq!(sha_a, hex(&Sha256::digest(&a)));
        let mut archive = tar::Archive::new(&a[..]);
        let mut names = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 0);
            assert_eq!(h.uid().unwrap(), 0);
            names.push(e.path().unwrap().display().to_string());
            if names.last().map(String::as_str) == Some("usr/sbin/iptables") {
                assert_eq!(
                    e.link_name().unwrap().unwrap().display().to_string(),
                    "/etc/alternatives/iptables"
                );
            }
        }
        let mut sorted = names.clone();
        sorted.sort_by(|x, y| Path::new(x).cmp(Path::new(y)));
        assert_eq!(names, sorted);
        assert!(
            names.contains(&"usr/local/bin/sluice".to_string()),
            "{names:?}"
        );
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let mut fs = Rootfs::default();
        fs.put(
            Path::new("usr/local/bin/sluice"),
            Entry::File {
                source: t.path().join("gone"),
                mode: 0o755,
            },
        );
        let out = t.path().join("img.tar");
        assert!(write_archive(&fs, "x:y", "0", &out).is_err());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
