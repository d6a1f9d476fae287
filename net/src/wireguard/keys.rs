//! The node's WireGuard key pair. The private key lives in one file (base64, as `wg genkey`
//! writes it), mode 0600 in a 0700 directory, written atomically; it never leaves the node and
//! never reaches a log (this type's `Debug` shows the public key only).

use super::WgError;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use gotatun::x25519::{PublicKey, StaticSecret};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// The node's key pair.
#[derive(Clone)]
pub struct KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh key pair from the kernel's random source.
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read as _;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self::from_secret(StaticSecret::from(bytes)))
    }

    /// The pair of a known private key (tests, and the key file).
    pub fn from_bytes(private: [u8; 32]) -> Self {
        Self::from_secret(StaticSecret::from(private))
    }

    fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// What peers need: goes into the lease record.
    pub fn public_base64(&self) -> String {
        BASE64.encode(self.public.as_bytes())
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.secret
    }
}

/// Reads a base64 public key as peers publish it.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], WgError> {
    BASE64
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| WgError::PublicKey(text.to_string()))
}

/// The key pair in `path`, made (and written) when the file does not exist. A file that exists
/// but does not hold a key is an error: replacing it silently would change the node's identity
/// behind the operator's back. A file readable by others is narrowed to 0600 with a warning.
pub fn load_or_create_key(path: &Path) -> Result<KeyPair, WgError> {
    let err = |reason: String| WgError::Key {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = BASE64
                .decode(text.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| err("does not hold a base64 32-byte key".into()))?;
            let mode = std::fs::metadata(path)
                .map_err(|e| err(e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "WireGuard key file was readable by others; narrowed to 0600");
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| err(format!("narrowing its mode: {e}")))?;
            }
            Ok(KeyPair::from_secret(StaticSecret::from(bytes)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair = KeyPair::generate().map_err(|e| err(format!("no randomness: {e}")))?;
            write_key(path, &pair).map_err(|e| err(format!("writing it: {e}")))?;
            tracing::info!(path = %path.display(), public_key = %pair.public_base64(), "WireGuard key pair created");
            Ok(pair)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Written to a temporary file of mode 0600 in the same directory, then renamed into place, so
/// the key is never readable by others and never half-written.
fn write_key(path: &Path, pair: &KeyPair) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("wireguard.key"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(BASE64.encode(pair.secret.to_bytes()).as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
