//! What a kubelet reports about its machine in the Node's status (`capacity`, `allocatable`,
//! `nodeInfo`), read once from this machine: every lab node shares it, as every kubelet of a
//! real one-machine cluster reports the whole machine. Reading is separate from the pure
//! [`MachineInfo::node_status`], which the unit tests drive with made-up machines.

use serde_json::{json, Value};

/// The kubelet's default `maxPods`.
pub const MAX_PODS: u32 = 110;
/// The kubelet's default hard eviction thresholds, which allocatable leaves out:
/// `memory.available<100Mi`, `nodefs.available<10%`.
const EVICTION_MEMORY_KI: u64 = 100 * 1024;
const EVICTION_NODEFS_PERCENT: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineInfo {
    pub cpus: u32,
    pub memory_ki: u64,
    pub hugepages_2mi_ki: u64,
    /// The size of the filesystem that holds `/var/lib` (a kubelet's root dir), in KiB.
    pub ephemeral_storage_ki: u64,
    pub kernel_version: String,
    pub os_image: String,
    /// Go's name for the architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    pub machine_id: String,
    pub boot_id: String,
}

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default()
}

/// The number in a `/proc/meminfo` line such as `MemTotal:  16384000 kB`.
fn meminfo_kb(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The CPUs in a sysfs list such as `0-3,6`.
fn count_cpus(list: &str) -> u32 {
    list.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(part.parse::<u32>().is_ok()),
        })
        .sum()
}

/// `PRETTY_NAME` of an os-release file.
fn pretty_name(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
}

fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl MachineInfo {
    /// This machine.
    pub fn read() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let hugepage_kb = meminfo_kb(&meminfo, "Hugepagesize");
        let hugepages_2mi_ki = if hugepage_kb == 2048 {
            meminfo_kb(&meminfo, "HugePages_Total") * 2048
        } else {
            0
        };
        let cpus = match count_cpus(&first_line("/sys/devices/system/cpu/online")) {
            0 => std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(1))
                .unwrap_or(1),
            n => n,
        };
        let ephemeral_storage_ki = nix::sys::statvfs::statvfs("/var/lib")
            .map(|s| s.blocks() * s.fragment_size() / 1024)
            .unwrap_or(0);
        let os_image = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| pretty_name(&t))
            .unwrap_or_else(|| "Linux".into());
        Self {
            cpus,
            memory_ki: meminfo_kb(&meminfo, "MemTotal"),
            hugepages_2mi_ki,
            ephemeral_storage_ki,
            kernel_version: first_line("/proc/sys/kernel/osrelease"),
            os_image,
            architecture: go_arch(std::env::consts::ARCH).to_string(),
            machine_id: first_line("/etc/machine-id"),
            boot_id: first_line("/proc/sys/kernel/random/boot_id"),
        }
    }

    /// The Node status fields a kubelet writes about its machine: `capacity`, `allocatable`
    /// (capacity less the default eviction thresholds) and `nodeInfo`.
    pub fn node_status(&self, kubelet_version: &str) -> Value {
        let ki = |v: u64| format!("{v}Ki");
        let capacity = json!({
            "cpu": self.cpus.to_string(),
            "memory": ki(self.memory_ki),
            "pods": MAX_PODS.to_string(),
            "ephemeral-storage": ki(self.ephemeral_storage_ki),
            "hugepages-1Gi": "0",
            "hugepages-2Mi": ki(self.hugepages_2mi_ki),
        });
        let nodefs_reserve = self.ephemeral_storage_ki * EVICTION_NODEFS_PERCENT / 100;
        let allocatable = json!({
            "cpu": self.cpus.to_string(),
            "memory": ki(self
                .memory_ki
                .saturating_sub(EVICTION_MEMORY_KI)
                .saturating_sub(self.hugepages_2mi_ki)),
            "pods": MAX_PODS.to_string(),
            // kube renders a fraction of a Ki this way too: whole bytes.
            "ephemeral-storage": (self.ephemeral_storage_ki.saturating_sub(nodefs_reserve) * 1024)
                .to_string(),
            "hugepages-1Gi": "0",
            "hugepages-2Mi": ki(self.hugepages_2mi_ki),
        });
        json!({
            "capacity": capacity,
            "allocatable": allocatable,
            "nodeInfo": {
                "machineID": self.machine_id,
                "systemUUID": self.machine_id,
                "bootID": self.boot_id,
                "kernelVersion": self.kernel_version,
                "osImage": self.os_image,
                "containerRuntimeVersion": format!("sluice-lab://{}", env!("CARGO_PKG_VERSION")),
                "kubeletVersion": kubelet_version,
                "kubeProxyVersion": kubelet_version,
                "operatingSystem": "linux",
                "architecture": self.architecture,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_kernel_says() {
        let meminfo = "MemTotal:        4026532 kB\nMemFree:  1 kB\nHugePages_Total:       0\nHugepagesize:       2048 kB\n";
        assert_eq!(meminfo_kb(meminfo, "MemTotal"), 4_026_532);
        assert_eq!(meminfo_kb(meminfo, "Mem"), 0);
        assert_eq!(count_cpus("0-1\n"), 2);
        assert_eq!(count_cpus("0-3,6,8-9"), 7);
        assert_eq!(count_cpus("garbage"), 0);
        assert_eq!(
            pretty_name("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(go_arch("x86_64"), "amd64");
    }

    #[test]
    fn status_is_what_a_kubelet_reports() {
        let m = MachineInfo {
            cpus: 2,
            memory_ki: 4_026_532,
            ephemeral_storage_ki: 1_000_000,
            kernel_version: "6.1.0".into(),
            os_image: "Debian".into(),
            architecture: "amd64".into(),
            ..MachineInfo::default()
        };
        let s = m.node_status("v1.33.0-sluice");
        assert_eq!(s["capacity"]["cpu"], "2");
        assert_eq!(s["capacity"]["memory"], "4026532Ki");
        assert_eq!(s["capacity"]["pods"], "110");
        assert_eq!(s["allocatable"]["memory"], "3924132Ki");
        assert_eq!(s["allocatable"]["ephemeral-storage"], "921600000");
        assert_eq!(s["nodeInfo"]["kernelVersion"], "6.1.0");
        assert_eq!(s["nodeInfo"]["architecture"], "amd64");
        assert!(s["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("sluice-lab://")));
    }

    #[test]
    fn this_machine_has_cpus_and_memory() {
        let m = MachineInfo::read();
        assert!(m.cpus >= 1 && m.memory_ki > 0, "{m:?}");
        assert!(!m.kernel_version.is_empty(), "{m:?}");
    }
}
