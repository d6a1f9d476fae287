//! `pods/log` (`kubectl logs`): the server runs no containers, so whoever does (the lab's kubelet)
//! tells it through [`PodLogs`] where a pod's log is. Lines in the CRI log format a kubelet writes
//! (`TIME STREAM TAG TEXT`) give `timestamps`, `sinceSeconds` and `sinceTime` their meaning; a
//! line in another format is passed as it is. `follow` streams what is appended until the pod is
//! gone (or the client leaves).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::objects::uid_of;
use crate::resources::PODS;
use crate::status::{invalid_value, ApiError};
use crate::ApiServer;

/// Where the log of a pod is, for `pods/log`; the lab's kubelet answers it.
pub trait PodLogs: Send + Sync + std::fmt::Debug {
    /// The log file of pod `namespace/pod`, which runs on `node` (all its containers share it).
    fn log_file(&self, namespace: &str, pod: &str, node: &str) -> Option<PathBuf>;
}

/// How often a followed log is read for what was appended.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// `PodLogOptions`, from the query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LogOptions {
    pub container: Option<String>,
    pub follow: bool,
    pub previous: bool,
    pub since: Option<jiff::Timestamp>,
    pub timestamps: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<usize>,
}

fn invalid(pod: &str, field: &str, value: &str, why: &str) -> ApiError {
    let mut e = ApiError::invalid(&PODS, pod, vec![invalid_value(field, value, why)]);
    e.message =
        format!("PodLogOptions \"{pod}\" is invalid: {field}: Invalid value: {value}: {why}");
    e.kind = Some("PodLogOptions".into());
    e
}

impl LogOptions {
    pub fn from_query(
        q: &HashMap<String, String>,
        pod: &str,
        now: jiff::Timestamp,
    ) -> Result<Self, ApiError> {
        let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
        let number = |k: &str| -> Result<Option<i64>, ApiError> {
            match q.get(k) {
                None => Ok(None),
                Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
                    ApiError::bad_request(format!("{k}: invalid value {v:?}: not an integer"))
                }),
            }
        };
        let non_negative = |k: &str, v: Option<i64>, min: i64| -> Result<Option<usize>, ApiError> {
            match v {
                Some(n) if n < min => Err(invalid(
                    pod,
                    k,
                    &n.to_string(),
                    if min == 0 {
                        "must be greater than or equal to 0"
                    } else {
                        "must be greater than 0"
                    },
                )),
                Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
                None => Ok(None),
            }
        };
        let since_seconds = non_negative("sinceSeconds", number("sinceSeconds")?, 1)?;
        let since_time = match q.get("sinceTime") {
            Some(t) => Some(t.parse::<jiff::Timestamp>().map_err(|e| {
                ApiError::bad_request(format!("sinceTime: invalid value {t:?}: {e}"))
            })?),
            None => None,
        };
        if since_seconds.is_some() && since_time.is_some() {
            return Err(invalid(
                pod,
                "sinceSeconds",
                "",
                "at most one of `sinceTime` or `sinceSeconds` may be specified",
            ));
        }
        let since = since_time.or_else(|| {
            since_seconds.and_then(|s| {
                now.checked_sub(jiff::SignedDuration::from_secs(i64::try_from(s).ok()?))
                    .ok()
            })
        });
        Ok(Self {
            container: q.get("container").filter(|c| !c.is_empty()).cloned(),
            follow: flag("follow"),
            previous: flag("previous"),
            since,
            timestamps: flag("timestamps"),
            tail_lines: non_negative("tailLines", number("tailLines")?, 0)?,
            limit_bytes: non_negative("limitBytes", number("limitBytes")?, 1)?,
        })
    }
}

/// A CRI log line's time and text (`2024-01-02T03:04:05.123456789Z stderr F text`).
fn split_line(line: &str) -> (Option<jiff::Timestamp>, &str) {
    let mut parts = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tag), Some(text)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (None, line);
    };
    match time.parse::<jiff::Timestamp>() {
        Ok(t) if matches!(stream, "stdout" | "stderr") && matches!(tag, "F" | "P") => {
            (Some(t), text)
        }
        _ => (None, line),
    }
}

/// What `lines` (whole lines, each ending in a newline) become under `opts`, apart from
/// `tailLines` and `limitBytes`.
fn render_lines<'a>(lines: impl Iterator<Item = &'a str>, opts: &LogOptions) -> Vec<String> {
    lines
        .filter_map(|line| {
            let (time, text) = split_line(line.trim_end_matches('\n'));
            if let (Some(since), Some(t)) = (opts.since, time) {
                if t < since {
                    return None;
                }
            }
            Some(match (opts.timestamps, time) {
                (true, Some(t)) => format!("{} {text}\n", t.strftime("%Y-%m-%dT%H:%M:%S%.9fZ")),
                _ => format!("{text}\n"),
            })
        })
        .collect()
}

/// The log text to send for `content` (pure).
pub(crate) fn render(content: &str, opts: &LogOptions) -> String {
    let mut lines = render_lines(content.split_inclusive('\n'), opts);
    if let Some(n) = opts.tail_lines {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    let mut out = lines.concat();
    if let Some(limit) = opts.limit_bytes {
        truncate_at_char(&mut out, limit);
    }
    out
}

fn truncate_at_char(s: &mut String, limit: usize) {
    if s.len() > limit {
        let mut cut = limit;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

fn containers(pod: &Value) -> Vec<String> {
    ["containers", "initContainers"]
        .iter()
        .filter_map(|l| pod.pointer(&format!("/spec/{l}")).and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str).map(String::from))
        .collect()
}

/// GET `pods/NAME/log`.
pub(crate) fn serve(
    api: &ApiServer,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let opts = LogOptions::from_query(q, name, jiff::Timestamp::now())?;
    let pod = api
        .with_store(|s| s.get(&PODS, ns, name).cloned())
        .ok_or_else(|| ApiError::not_found(&PODS, name))?;
    let names = containers(&pod);
    let container = match (&opts.container, names.as_slice()) {
        (Some(c), _) if names.contains(c) => c.clone(),
        (Some(c), _) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )))
        }
        (None, [only]) => only.clone(),
        (None, _) => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    if opts.previous {
        return Err(ApiError::bad_request(format!(
            "previous terminated container \"{container}\" in pod \"{name}\" not found"
        )));
    }
    let Some(source) = api.options().pod_logs.clone() else {
        let mut e = ApiError::method_not_allowed();
        e.message = "pods/log is not served by this API server: nothing that runs pods gave it their logs (the lab's daemon does)".into();
        return Err(e);
    };
    let waiting = || {
        ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
        ))
    };
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(waiting)?;
    let path = source.log_file(ns, name, node).ok_or_else(waiting)?;
    let mut file = std::fs::File::open(&path).map_err(|_| waiting())?;
    let mut raw = Vec::new();
    file.read_to_end(&mut raw)
        .map_err(|e| ApiError::internal(format!("reading the log of pod {name}: {e}")))?;
    // A last line still being written waits for its newline when following.
    let whole = if opts.follow {
        raw.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1)
    } else {
        raw.len()
    };
    let first = render(&String::from_utf8_lossy(&raw[..whole]), &opts);
    let text_plain = [(header::CONTENT_TYPE, "text/plain")];
    if !opts.follow {
        return Ok((text_plain, first).into_response());
    }
    let follow = Follow {
        api: api.clone(),
        ns: ns.to_string(),
        name: name.to_string(),
        uid: uid_of(&pod).to_string(),
        file,
        offset: whole as u64,
        sent: first.len(),
        opts,
        first: Some(first),
    };
    let stream = futures::stream::unfold(follow, Follow::next);
    Ok((text_plain, crate::http::stream_body(stream)).into_response())
}

/// A followed log: what was sent, and where the file was read to.
struct Follow {
    api: ApiServer,
    ns: String,
    name: String,
    uid: String,
    file: std::fs::File,
    offset: u64,
    sent: usize,
    opts: LogOptions,
    first: Option<String>,
}

impl Follow {
    fn pod_is_there(&self) -> bool {
        self.api.with_store(|s| {
            s.get(&PODS, &self.ns, &self.name)
                .is_some_and(|p| uid_of(p) == self.uid)
        })
    }

    /// The whole lines appended since the last read.
    fn appended(&mut self) -> std::io::Result<String> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut raw = Vec::new();
        self.file.read_to_end(&mut raw)?;
        let whole = raw.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.offset += whole as u64;
        Ok(String::from_utf8_lossy(&raw[..whole]).into_owned())
    }

    async fn next(mut self) -> Option<(Result<Bytes, std::convert::Infallible>, Self)> {
        if let Some(first) = self.first.take().filter(|f| !f.is_empty()) {
            return Some((Ok(Bytes::from(first)), self));
        }
        loop {
            if self.opts.limit_bytes.is_some_and(|l| self.sent >= l) || !self.pod_is_there() {
                return None;
            }
            let new = self.appended().ok()?;
            if !new.is_empty() {
                let mut text = render_lines(new.split_inclusive('\n'), &self.opts).concat();
                if let Some(limit) = self.opts.limit_bytes {
                    truncate_at_char(&mut text, limit - self.sent);
                }
                if !text.is_empty() {
                    self.sent += text.len();
                    return Some((Ok(Bytes::from(text)), self));
                }
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-01-01T00:00:01.000000001Z stderr F x/a: serving Tcp/80\n\
                       2026-01-01T00:00:05.5Z stderr F tcp/80: answered 10.244.1.2:40000\n\
                       not a CRI line\n\
                       2026-01-01T00:00:09Z stdout F last\n";

    #[test]
    fn renders_as_a_kubelet_does() {
        let o = LogOptions::default();
        assert_eq!(
            render(LOG, &o),
            "x/a: serving Tcp/80\ntcp/80: answered 10.244.1.2:40000\nnot a CRI line\nlast\n"
        );
        let tail = LogOptions {
            tail_lines: Some(1),
            timestamps: true,
            ..o.clone()
        };
        assert_eq!(render(LOG, &tail), "2026-01-01T00:00:09.000000000Z last\n");
        let since = LogOptions {
            since: Some("2026-01-01T00:00:05Z".parse().unwrap()),
            ..o.clone()
        };
        // A line without a time is not filtered out.
        assert_eq!(
            render(LOG, &since),
            "tcp/80: answered 10.244.1.2:40000\nnot a CRI line\nlast\n"
        );
        let limited = LogOptions {
            limit_bytes: Some(5),
            ..o
        };
        assert_eq!(render(LOG, &limited), "x/a: ");
    }

    #[test]
    fn options_from_the_query() {
        let now: jiff::Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let o = LogOptions::from_query(
            &q(&[
                ("follow", "true"),
                ("tailLines", "10"),
                ("sinceSeconds", "60"),
            ]),
            "p",
            now,
        )
        .unwrap();
        assert!(o.follow && o.tail_lines == Some(10));
        assert_eq!(o.since, Some("2026-01-01T00:00:00Z".parse().unwrap()));
        let e = LogOptions::from_query(&q(&[("tailLines", "-1")]), "p", now).unwrap_err();
        assert_eq!(e.code, 422);
        let e = LogOptions::from_query(&q(&[("limitBytes", "x")]), "p", now).unwrap_err();
        assert_eq!(e.code, 400);
    }
}
