//! Label and field selectors, with kube-apiserver's syntax and matching rules.

use serde_json::Value;

use crate::resources::Resource;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Exists,
    DoesNotExist,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed label selector (requirements joined by AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    reqs: Vec<Requirement>,
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("found '{rest}', expected: '('"))?;
    let mut vals = Vec::new();
    for v in inner.split(',') {
        let v = v.trim();
        if !valid_value(v) {
            return Err(format!("invalid label value: {v:?}"));
        }
        vals.push(v.to_string());
    }
    Ok(vals)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    let p = part.trim();
    if p.is_empty() {
        return Err("found '', expected: identifier".to_string());
    }
    if let Some(k) = p.strip_prefix('!') {
        let k = k.trim();
        if !valid_key(k) {
            return Err(format!("invalid label key {k:?}"));
        }
        return Ok(Requirement {
            key: k.to_string(),
            op: Op::DoesNotExist,
        });
    }
    // Set-based: `key in (..)` / `key notin (..)`.
    let key_end = p
        .find(|c: char| c.is_whitespace() || matches!(c, '=' | '!' | '<' | '>' | '('))
        .unwrap_or(p.len());
    let key = &p[..key_end];
    if !valid_key(key) {
        return Err(format!("invalid label key {key:?}"));
    }
    let rest = p[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(Requirement {
            key: key.to_string(),
            op: Op::Exists,
        });
    }
    let (op, value) = if let Some(v) = rest.strip_prefix("notin") {
        (Op::NotIn(parse_set(v)?), None)
    } else if let Some(v) = rest.strip_prefix("in") {
        (Op::In(parse_set(v)?), None)
    } else if let Some(v) = rest.strip_prefix("==") {
        (Op::Equals(String::new()), Some(v))
    } else if let Some(v) = rest.strip_prefix("!=") {
        (Op::NotEquals(String::new()), Some(v))
    } else if let Some(v) = rest.strip_prefix('=') {
        (Op::Equals(String::new()), Some(v))
    } else if let Some(v) = rest.strip_prefix('>') {
        let n = v.trim().parse().map_err(|_| {
            format!(
                "for 'Gt', 'Lt' operators, the value must be an integer, got {:?}",
                v.trim()
            )
        })?;
        (Op::Gt(n), None)
    } else if let Some(v) = rest.strip_prefix('<') {
        let n = v.trim().parse().map_err(|_| {
            format!(
                "for 'Gt', 'Lt' operators, the value must be an integer, got {:?}",
                v.trim()
            )
        })?;
        (Op::Lt(n), None)
    } else {
        return Err(format!(
            "found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
        ));
    };
    let op = match (op, value) {
        (Op::Equals(_), Some(v)) => {
            let v = v.trim();
            if !valid_value(v) {
                return Err(format!("invalid label value: {v:?}"));
            }
            Op::Equals(v.to_string())
        }
        (Op::NotEquals(_), Some(v)) => {
            let v = v.trim();
            if !valid_value(v) {
                return Err(format!("invalid label value: {v:?}"));
            }
            Op::NotEquals(v.to_string())
        }
        (op, _) => op,
    };
    Ok(Requirement {
        key: key.to_string(),
        op,
    })
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (f,g),!h`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let reqs = split_top(s)
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("unable to parse requirement: {e}"))?;
        Ok(Self { reqs })
    }

    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| {
            let v = get(&r.key);
            match &r.op {
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::Equals(x) => v == Some(x.as_str()),
                Op::NotEquals(x) => v != Some(x.as_str()),
                Op::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
                Op::NotIn(xs) => !v.is_some_and(|v| xs.iter().any(|x| x == v)),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }

    pub fn matches_object(&self, obj: &Value) -> bool {
        self.matches(obj.pointer("/metadata/labels").and_then(Value::as_object))
    }
}

/// One `field=value` / `field!=value` term.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    value: String,
    negate: bool,
}

/// A parsed field selector (terms joined by AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector {
    terms: Vec<FieldTerm>,
}

/// Undoes the `\,`, `\=` and `\\` escapes of field selector values.
fn unescape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits on unescaped commas.
fn split_escaped(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

impl FieldSelector {
    /// Parses `metadata.name=x,spec.nodeName!=y`, checking fields against `res`.
    pub fn parse(s: &str, res: &Resource) -> Result<Self, String> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self { terms });
        }
        for part in split_escaped(s) {
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !supported_field(res, field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push(FieldTerm {
                field: field.to_string(),
                value: unescape(value),
                negate,
            });
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|t| {
            let v = field_value(obj, &t.field);
            (v == t.value) != t.negate
        })
    }
}

fn supported_field(res: &Resource, field: &str) -> bool {
    if matches!(field, "metadata.name" | "metadata.namespace") {
        return true;
    }
    match res.name {
        "pods" => matches!(
            field,
            "spec.nodeName"
                | "spec.restartPolicy"
                | "spec.schedulerName"
                | "spec.serviceAccountName"
                | "spec.hostNetwork"
                | "status.phase"
                | "status.podIP"
                | "status.nominatedNodeName"
        ),
        "nodes" => field == "spec.unschedulable",
        "namespaces" => field == "status.phase",
        "events" => matches!(
            field,
            "involvedObject.kind"
                | "involvedObject.namespace"
                | "involvedObject.name"
                | "involvedObject.uid"
                | "involvedObject.apiVersion"
                | "involvedObject.resourceVersion"
                | "involvedObject.fieldPath"
                | "reason"
                | "reportingComponent"
                | "source"
                | "type"
        ),
        _ => false,
    }
}

/// The string value a field selector compares for `field` (missing is "").
fn field_value(obj: &Value, field: &str) -> String {
    // Events: `source` is source.component (else reportingController), `reportingComponent`
    // is reportingController (kube's event field set).
    let text = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("");
    match field {
        "source" => {
            let c = text("/source/component");
            return if c.is_empty() {
                text("/reportingController").to_string()
            } else {
                c.to_string()
            };
        }
        "reportingComponent" => return text("/reportingController").to_string(),
        _ => {}
    }
    let ptr = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&ptr) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => match field {
            "spec.hostNetwork" | "spec.unschedulable" => "false".to_string(),
            _ => String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{CONFIGMAPS, EVENTS, NODES, PODS};
    use serde_json::json;

    fn labels(v: Value) -> Value {
        json!({"metadata": {"labels": v}})
    }

    #[test]
    fn label_selector_table() {
        let o = labels(json!({"app": "web", "tier": "front", "n": "5"}));
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("app notin (db)", true),
            ("missing notin (db)", true),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("app in (web),!missing,tier", true),
            ("n>4", true),
            ("n<4", false),
        ];
        for (sel, want) in cases {
            let s = LabelSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches_object(&o), want, "selector {sel:?}");
        }
        assert!(LabelSelector::parse("a=b").is_ok_and(|s| !s.matches_object(&json!({}))));
    }

    #[test]
    fn label_selector_errors() {
        for bad in ["a in b", "=x", "a=b c", "a in (x", ",", "a>x"] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"},
            "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let m = |s: &str| FieldSelector::parse(s, &PODS).map(|f| f.matches(&pod));
        assert_eq!(m("metadata.name=p"), Ok(true));
        assert_eq!(m("metadata.name==p,metadata.namespace=ns"), Ok(true));
        assert_eq!(m("spec.nodeName=n2"), Ok(false));
        assert_eq!(m("spec.nodeName!=n2"), Ok(true));
        assert_eq!(m("status.phase=Running"), Ok(true));
        assert_eq!(m("status.podIP="), Ok(true));
        assert_eq!(
            m("spec.foo=x"),
            Err("field label not supported: spec.foo".to_string())
        );
        assert!(FieldSelector::parse("spec.nodeName=x", &CONFIGMAPS).is_err());
        let node = json!({"metadata": {"name": "n"}});
        assert_eq!(
            FieldSelector::parse("spec.unschedulable=false", &NODES).map(|f| f.matches(&node)),
            Ok(true)
        );
        let escaped = json!({"metadata": {"name": "a,b"}});
        assert_eq!(
            FieldSelector::parse("metadata.name=a\\,b", &PODS).map(|f| f.matches(&escaped)),
            Ok(true)
        );
    }

    #[test]
    fn event_field_selectors() {
        let ev = json!({"metadata": {"name": "e", "namespace": "ns"},
            "involvedObject": {"kind": "ConfigMap", "name": "c", "namespace": "ns", "uid": "u"},
            "reason": "R", "type": "Normal", "reportingController": "ctl"});
        let m = |s: &str| FieldSelector::parse(s, &EVENTS).map(|f| f.matches(&ev));
        assert_eq!(
            m("involvedObject.name=c,involvedObject.namespace=ns,involvedObject.kind=ConfigMap,involvedObject.uid=u"),
            Ok(true)
        );
        assert_eq!(m("involvedObject.uid=v"), Ok(false));
        assert_eq!(m("source=ctl,reportingComponent=ctl,type=Normal"), Ok(true));
        assert!(m("spec.nodeName=x").is_err());
    }
}
