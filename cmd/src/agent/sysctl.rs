//! The few sysctls the agent keeps set. A container's `/proc/sys` is read-only, so where writing
//! there fails the agent writes through the host's `/proc/sys/net`, which the manifest mounts at
//! `/host/proc/sys/net` (as Cilium's does); both show the agent's own (host) network namespace.

/// Makes `/proc/sys/KEY` (a `net/...` key) read `value`; Ok(true) when it had to change it.
pub fn ensure(key: &str, value: &str) -> Result<bool, String> {
    let own = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&own).is_ok_and(|v| v.trim() == value) {
        return Ok(false);
    }
    let mut errors = Vec::new();
    for path in [own, format!("/host/proc/sys/{key}")] {
        match std::fs::write(&path, value) {
            Ok(()) => return Ok(true),
            Err(e) => errors.push(format!("{path}: {e}")),
        }
    }
    Err(format!(
        "{} is not {value} and cannot be set ({})",
        key.replace('/', "."),
        errors.join("; ")
    ))
}
