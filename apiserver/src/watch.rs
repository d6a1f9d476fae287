//! Watch streams: replay from history or initial state, live events, bookmarks, 410 Expired.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::http::{selectors, stream_body, ListQuery};
use crate::objects::{namespace_of, rv_of};
use crate::resources::Resource;
use crate::status::ApiError;
use crate::store::{Event, EventType};
use crate::table;
use crate::ApiServer;

/// Stands in for a timeout too long to represent (as tokio's `sleep` does).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// Watch query parameters.
pub(crate) struct Params {
    sel: ListQuery,
    rv: Option<u64>,
    bookmarks: bool,
    send_initial: bool,
    timeout: Duration,
    table: bool,
    query: HashMap<String, String>,
}

impl Params {
    pub fn from_query(
        res: &Resource,
        q: &HashMap<String, String>,
        table: bool,
    ) -> Result<Self, ApiError> {
        let sel = selectors(res, q)?;
        let rv =
            match q.get("resourceVersion").map(String::as_str) {
                None | Some("") | Some("0") => None,
                Some(r) => Some(r.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version {r:?}"))
                })?),
            };
        // Like kube-apiserver, no timeout (or 0) means its minimum request timeout (1800 s).
        let timeout = match q.get("timeoutSeconds") {
            Some(t) => Duration::from_secs(
                t.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
            ),
            None => Duration::ZERO,
        };
        let timeout = if timeout.is_zero() {
            Duration::from_secs(1800)
        } else {
            timeout
        };
        Ok(Self {
            sel,
            rv,
            bookmarks: q
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true" || b == "1"),
            send_initial: q
                .get("sendInitialEvents")
                .is_some_and(|b| b == "true" || b == "1"),
            timeout,
            table,
            query: q.clone(),
        })
    }
}

struct Filter {
    ns: Option<String>,
    sel: ListQuery,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.ns.as_deref().is_none_or(|ns| namespace_of(obj) == ns)
            && self.sel.labels.matches_object(obj)
            && self.sel.fields.matches(obj)
    }

    /// What this watcher sees of an event (selectors turn some into ADDED or DELETED).
    fn view(&self, e: &Event) -> Option<(EventType, Arc<Value>)> {
        match e.kind {
            EventType::Added => self
                .matches(&e.object)
                .then(|| (EventType::Added, Arc::clone(&e.object))),
            EventType::Deleted => {
                let m =
                    e.old.as_deref().is_some_and(|o| self.matches(o)) || self.matches(&e.object);
                m.then(|| (EventType::Deleted, Arc::clone(&e.object)))
            }
            EventType::Modified => {
                let was = e.old.as_deref().is_some_and(|o| self.matches(o));
                let is = self.matches(&e.object);
                match (was, is) {
                    (true, true) => Some((EventType::Modified, Arc::clone(&e.object))),
                    (false, true) => Some((EventType::Added, Arc::clone(&e.object))),
                    (true, false) => Some((EventType::Deleted, Arc::clone(&e.object))),
                    (false, false) => None,
                }
            }
        }
    }
}

struct Watch {
    api: ApiServer,
    res: Resource,
    filter: Filter,
    pending: VecDeque<Bytes>,
    rx: Option<mpsc::UnboundedReceiver<Arc<Event>>>,
    /// When the next bookmark is due (`None`: this watch gets no more bookmarks).
    bookmark: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    bookmark_interval: Duration,
    deadline_at: tokio::time::Instant,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    last_rv: u64,
    table: bool,
    query: HashMap<String, String>,
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

impl Watch {
    fn event(&self, kind: &str, obj: &Value) -> Bytes {
        let object = if self.table {
            table::table(
                &self.res,
                &[obj],
                rv_of(obj),
                &self.query,
                jiff::Timestamp::now(),
            )
        } else {
            obj.clone()
        };
        line(&json!({"type": kind, "object": object}))
    }

    fn push(&mut self, e: &Event) {
        self.last_rv = self.last_rv.max(e.rv);
        if let Some((kind, obj)) = self.filter.view(e) {
            let b = self.event(kind.as_str(), &obj);
            self.pending.push_back(b);
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(&json!({"type": "BOOKMARK", "object": {
            "kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": meta}}))
    }

    /// Like kube-apiserver's cacher (`nextBookmarkTime`): the next bookmark comes after the
    /// bookmark interval, but no later than 2 s before the watch's timeout, so that the client
    /// can resume from a fresh resourceVersion; none once that moment has passed.
    fn schedule_bookmark(&mut self) {
        let now = tokio::time::Instant::now();
        let periodic = now
            .checked_add(self.bookmark_interval)
            .unwrap_or(self.deadline_at);
        let next = match self.deadline_at.checked_sub(Duration::from_secs(2)) {
            Some(pre) if pre < periodic => pre,
            Some(_) => periodic,
            None => now,
        };
        self.bookmark = (next > now).then(|| Box::pin(tokio::time::sleep_until(next)));
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some((Ok(b), self));
            }
            let rx = self.rx.as_mut()?;
            let tick = async {
                match self.bookmark.as_mut() {
                    Some(sleep) => sleep.as_mut().await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(e) => self.push(&e),
                    None => return None,
                },
                () = tick => {
                    // Everything up to the current rv is already in the channel: drain it first.
                    let cur = self.api.with_store(|s| s.current_rv());
                    while let Some(rx) = self.rx.as_mut() {
                        match rx.try_recv() {
                            Ok(e) => self.push(&e),
                            Err(_) => break,
                        }
                    }
                    let rv = cur.max(self.last_rv);
                    self.last_rv = rv;
                    let b = self.bookmark(rv, false);
                    self.pending.push_back(b);
                    self.schedule_bookmark();
                }
                () = &mut self.deadline => return None,
            }
        }
    }
}

/// Starts a watch of `res` (in `ns`, if given) and returns the streaming response.
pub(crate) fn serve(api: ApiServer, res: Resource, ns: Option<String>, p: Params) -> Response {
    let filter = Filter { ns, sel: p.sel };
    let started = api.with_store(|s| {
        let current = s.current_rv();
        let initial: Vec<Value> = match p.rv {
            Some(_) if !p.send_initial => Vec::new(),
            _ => s
                .list(&res, filter.ns.as_deref())
                .filter(|o| filter.matches(o))
                .cloned()
                .collect(),
        };
        let from = if p.send_initial || p.rv.is_none() {
            Some(current)
        } else {
            p.rv.map(|r| r.min(current))
        };
        s.subscribe(&res, from).map(|sub| (current, initial, sub))
    });
    let interval = api
        .options()
        .bookmark_interval
        .max(Duration::from_millis(10));
    let now = tokio::time::Instant::now();
    let deadline_at = now
        .checked_add(p.timeout)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now);
    let mut w = Watch {
        api,
        res,
        filter,
        pending: VecDeque::new(),
        rx: None,
        bookmark: None,
        bookmark_interval: interval,
        deadline_at,
        deadline: Box::pin(tokio::time::sleep_until(deadline_at)),
        last_rv: 0,
        table: p.table,
        query: p.query,
    };
    match started {
        Err(too_old) => {
            let e = ApiError::expired(format!(
                "too old resource version: {} ({})",
                too_old.requested, too_old.oldest
            ));
            w.pending
                .push_back(line(&json!({"type": "ERROR", "object": e.to_status()})));
        }
        Ok((current, initial, sub)) => {
            w.last_rv = p.rv.unwrap_or(current).min(current);
            for o in &initial {
                let b = w.event("ADDED", o);
                w.pending.push_back(b);
            }
            if p.send_initial {
                w.last_rv = current;
                let b = w.bookmark(current, true);
                w.pending.push_back(b);
            }
            for e in &sub.replay {
                w.push(e);
            }
            w.rx = Some(sub.rx);
            if p.bookmarks {
                w.schedule_bookmark();
            }
        }
    }
    let stream = futures::stream::unfold(w, Watch::next);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        stream_body(stream),
    )
        .into_response()
}
