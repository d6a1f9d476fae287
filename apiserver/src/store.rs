//! The object store: objects by (resource, namespace, name), one resourceVersion counter,
//! a bounded event history for watch resume, live watchers, and the state file.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::objects::{metadata_mut, name_of, namespace_of};
use crate::resources::{self, Resource};
use crate::ApiServerError;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it.
#[derive(Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub resource: &'static str,
    pub kind: EventType,
    pub object: Arc<Value>,
    /// The object before the change (to turn "stopped matching a selector" into DELETED).
    pub old: Option<Arc<Value>>,
}

struct Watcher {
    resource: &'static str,
    tx: mpsc::UnboundedSender<Arc<Event>>,
}

type Key = (&'static str, String, String);

/// Why a watch could not start where it asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooOld {
    pub requested: u64,
    pub oldest: u64,
}

/// A new watcher: the events to replay, then the live channel.
pub(crate) struct Subscription {
    pub replay: Vec<Arc<Event>>,
    pub rx: mpsc::UnboundedReceiver<Arc<Event>>,
}

pub(crate) struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    /// Every event with rv > history_start is in `history`.
    history_start: u64,
    history_cap: usize,
    watchers: Vec<Watcher>,
    state_file: Option<PathBuf>,
    dirty: bool,
}

/// Writes `bytes` to a new file `path` readable by its owner alone (the state holds every
/// object, ConfigMaps included), replacing what a crash left there.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode through open: make it 0600 as well.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

fn key(res: &Resource, ns: &str, name: &str) -> Key {
    (res.name, ns.to_string(), name.to_string())
}

impl Store {
    /// Loads the state file if it exists, else starts with the standard namespaces.
    pub fn open(
        state_file: Option<PathBuf>,
        history_cap: usize,
        now: &str,
    ) -> Result<Self, ApiServerError> {
        let mut store = Self {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_start: 0,
            history_cap,
            watchers: Vec::new(),
            state_file,
            dirty: false,
        };
        let loaded = match store.state_file.clone() {
            Some(path) => store.load(&path)?,
            None => false,
        };
        if !loaded {
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                store.rv += 1;
                let obj = json!({
                    "kind": "Namespace", "apiVersion": "v1",
                    "metadata": {"name": ns, "uid": uuid::Uuid::new_v4().to_string(),
                        "resourceVersion": store.rv.to_string(), "creationTimestamp": now,
                        "labels": {"kubernetes.io/metadata.name": ns}},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"}
                });
                store
                    .objects
                    .insert(key(&resources::NAMESPACES, "", ns), obj);
            }
            store.dirty = true;
            store.flush();
        }
        store.history_start = store.rv;
        Ok(store)
    }

    fn load(&mut self, path: &Path) -> Result<bool, ApiServerError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(ApiServerError::State {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let state: Value =
            serde_json::from_slice(&text).map_err(|source| ApiServerError::Corrupt {
                path: path.to_path_buf(),
                source,
            })?;
        self.rv = state
            .get("resourceVersion")
            .and_then(|v| {
                v.as_str()
                    .and_then(|s| s.parse().ok())
                    .or_else(|| v.as_u64())
            })
            .unwrap_or(0);
        if let Some(objs) = state.get("objects").and_then(Value::as_object) {
            for (res_name, list) in objs {
                let Some(res) = resources::by_name(res_name) else {
                    tracing::warn!(resource = %res_name, "state file: unknown resource, skipped");
                    continue;
                };
                for obj in list.as_array().into_iter().flatten() {
                    let k = key(&res, namespace_of(obj), name_of(obj));
                    self.objects.insert(k, obj.clone());
                }
            }
        }
        Ok(true)
    }

    /// Writes the state file if anything changed (atomically: temp file, then rename).
    pub fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let Some(path) = &self.state_file else {
            return;
        };
        let mut by_res: Map<String, Value> = Map::new();
        for ((res, _, _), obj) in &self.objects {
            if let Value::Array(a) = by_res
                .entry(res.to_string())
                .or_insert_with(|| Value::Array(Vec::new()))
            {
                a.push(obj.clone());
            }
        }
        let state = json!({"resourceVersion": self.rv.to_string(), "objects": by_res});
        let result = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let mut tmp = path.clone().into_os_string();
                tmp.push(".tmp");
                write_private(std::path::Path::new(&tmp), &bytes)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "could not write the state file");
            self.dirty = true;
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, res: &Resource, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&key(res, ns, name))
    }

    /// Objects of `res` (in `ns` if given), in key order.
    pub fn list<'a>(
        &'a self,
        res: &Resource,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let name = res.name;
        let lo = (name, ns.unwrap_or("").to_string(), String::new());
        self.objects
            .range(lo..)
            .take_while(move |((r, n, _), _)| *r == name && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
    }

    /// The objects of `res` (in `ns` if given) as they were at `rv`, by undoing the later events
    /// in the history; `None` when the history does not reach back that far.
    pub fn snapshot_at(&self, res: &Resource, ns: Option<&str>, rv: u64) -> Option<Vec<Value>> {
        if rv < self.history_start || rv > self.rv {
            return None;
        }
        let mut map: BTreeMap<(String, String), Value> = self
            .list(res, ns)
            .map(|o| {
                (
                    (namespace_of(o).to_string(), name_of(o).to_string()),
                    o.clone(),
                )
            })
            .collect();
        for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if e.resource != res.name {
                continue;
            }
            let k = (
                namespace_of(&e.object).to_string(),
                name_of(&e.object).to_string(),
            );
            if ns.is_some_and(|ns| ns != k.0) {
                continue;
            }
            match (e.kind, &e.old) {
                (EventType::Added, _) => {
                    map.remove(&k);
                }
                (_, Some(old)) => {
                    map.insert(k, (**old).clone());
                }
                (_, None) => {}
            }
        }
        Some(map.into_values().collect())
    }

    /// Every object, with its resource.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, &Value)> {
        self.objects.iter().map(|((r, _, _), v)| (*r, v))
    }

    fn emit(&mut self, event: Event) {
        let event = Arc::new(event);
        self.watchers
            .retain(|w| w.resource != event.resource || w.tx.send(Arc::clone(&event)).is_ok());
        self.history.push_back(event);
        while self.history.len() > self.history_cap {
            if let Some(e) = self.history.pop_front() {
                self.history_start = e.rv;
            }
        }
        self.dirty = true;
    }

    /// Stores `obj` (new or replacing), with the next resourceVersion; returns the stored object.
    pub fn put(&mut self, res: &Resource, mut obj: Value) -> Value {
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let k = key(res, namespace_of(&obj), name_of(&obj));
        let old = self.objects.insert(k, obj.clone());
        let kind = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.emit(Event {
            rv: self.rv,
            resource: res.name,
            kind,
            object: Arc::new(obj.clone()),
            old: old.map(Arc::new),
        });
        obj
    }

    /// Removes an object; returns it as of its deletion (with the deletion's resourceVersion).
    pub fn remove(&mut self, res: &Resource, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&key(res, ns, name))?;
        let old = obj.clone();
        self.rv += 1;
        metadata_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.emit(Event {
            rv: self.rv,
            resource: res.name,
            kind: EventType::Deleted,
            object: Arc::new(obj.clone()),
            old: Some(Arc::new(old)),
        });
        Some(obj)
    }

    /// Starts a watch of `res` after `from` (`None`: from now, no replay).
    pub fn subscribe(&mut self, res: &Resource, from: Option<u64>) -> Result<Subscription, TooOld> {
        let replay = match from {
            Some(rv) if rv < self.history_start => {
                return Err(TooOld {
                    requested: rv,
                    oldest: self.history_start,
                })
            }
            Some(rv) => self
                .history
                .iter()
                .filter(|e| e.rv > rv && e.resource == res.name)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(Watcher {
            resource: res.name,
            tx,
        });
        Ok(Subscription { replay, rx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{CONFIGMAPS, NAMESPACES};

    fn cm(ns: &str, name: &str) -> Value {
        json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": name, "namespace": ns}})
    }

    #[test]
    fn starts_with_namespaces_and_lists_in_order() {
        let mut s = Store::open(None, 10, "t").unwrap();
        assert_eq!(s.list(&NAMESPACES, None).count(), 4);
        assert_eq!(s.current_rv(), 4);
        s.put(&CONFIGMAPS, cm("b", "x"));
        s.put(&CONFIGMAPS, cm("a", "y"));
        s.put(&CONFIGMAPS, cm("a", "x"));
        let names: Vec<String> = s
            .list(&CONFIGMAPS, None)
            .map(|o| format!("{}/{}", namespace_of(o), name_of(o)))
            .collect();
        assert_eq!(names, ["a/x", "a/y", "b/x"]);
        assert_eq!(s.list(&CONFIGMAPS, Some("a")).count(), 2);
        assert_eq!(s.list(&CONFIGMAPS, Some("c")).count(), 0);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = Store::open(None, 2, "t").unwrap();
        let start = s.current_rv();
        for i in 0..3 {
            s.put(&CONFIGMAPS, cm("a", &format!("c{i}")));
        }
        assert!(s.subscribe(&CONFIGMAPS, Some(start)).is_err());
        assert!(s.snapshot_at(&CONFIGMAPS, None, start).is_none());
        let snap = s.snapshot_at(&CONFIGMAPS, None, start + 2).unwrap();
        assert_eq!(snap.len(), 2);
        let sub = s.subscribe(&CONFIGMAPS, Some(start + 1)).unwrap();
        assert_eq!(sub.replay.len(), 2);
        let removed = s.remove(&CONFIGMAPS, "a", "c0").unwrap();
        assert_eq!(
            removed["metadata"]["resourceVersion"],
            (start + 4).to_string()
        );
    }

    #[test]
    fn persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut s = Store::open(Some(path.clone()), 10, "t").unwrap();
        s.put(&CONFIGMAPS, cm("default", "x"));
        s.flush();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the state file is its owner's alone");
        let rv = s.current_rv();
        let s2 = Store::open(Some(path), 10, "t").unwrap();
        assert_eq!(s2.current_rv(), rv);
        assert!(s2.get(&CONFIGMAPS, "default", "x").is_some());
    }
}
