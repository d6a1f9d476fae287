//! Reading a request's object into its kind's typed form, as kube-apiserver's decoder does: a
//! value of the wrong type is refused, naming its field, and a field the kind does not have is
//! dropped; `fieldValidation` says whether a dropped field is ignored, warned about (the default
//! since v1.23), or refused.
//!
//! The typed forms are k8s-openapi's, the same Go types' schema kube-apiserver decodes into: each
//! kind's object is deserialized into its type (which keeps the fields it declares and skips the
//! rest) and serialized back. Comparing what came in with what came out names the dropped fields.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::ops::Ctx;
use crate::resources::Resource;
use crate::status::{ApiError, Cause};

/// What the server does with a field the kind does not have (the `fieldValidation` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    /// The query parameter's value; `Err` carries the cause of kube-apiserver's 422.
    pub fn parse(value: Option<&str>) -> Result<Self, Cause> {
        match value.unwrap_or("") {
            "" | "Warn" => Ok(Self::Warn),
            "Ignore" => Ok(Self::Ignore),
            "Strict" => Ok(Self::Strict),
            other => Err(Cause {
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {other:?}: supported values: \"\", \"Ignore\", \"Strict\", \"Warn\""
                ),
                field: "fieldValidation".into(),
            }),
        }
    }
}

/// A value the kind's typed form cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TypeMismatch {
    /// The field's path (`spec.containers[0].ports[1].containerPort`).
    pub field: String,
    pub message: String,
}

impl TypeMismatch {
    fn cause(&self) -> Cause {
        Cause {
            reason: "FieldValueTypeInvalid",
            message: self.message.clone(),
            field: self.field.clone(),
        }
    }

    fn text(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// An object as its kind's typed form reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decoded {
    /// What the typed form writes back (kube-apiserver stores this).
    pub typed: Value,
    /// What was sent, less the fields the kind does not have.
    pub pruned: Value,
    /// Those fields' paths, in the order of the object's keys.
    pub unknown: Vec<String>,
}

type Codec = fn(Value) -> Result<Value, TypeMismatch>;

/// A custom resource as a CRD without a schema of its own stores it: typed metadata, the spec
/// as sent (the agent reads each ClusterNetworkPolicy on its own and skips one it cannot).
#[derive(serde::Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct CustomObject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<Value>,
}

fn typed<K: DeserializeOwned + Serialize>(v: Value) -> Result<Value, TypeMismatch> {
    let k: K = serde_path_to_error::deserialize(v).map_err(|e| TypeMismatch {
        field: if e.path().iter().next().is_some() {
            e.path().to_string()
        } else {
            String::new()
        },
        message: e.inner().to_string(),
    })?;
    serde_json::to_value(k).map_err(|e| TypeMismatch {
        field: String::new(),
        message: e.to_string(),
    })
}

/// The typed form of each served kind. A kind added to `resources::ALL` adds its type here (a
/// unit test below holds every served kind to it).
fn codec(res: &Resource) -> Option<Codec> {
    use k8s_openapi::api::coordination::v1 as coordination;
    use k8s_openapi::api::core::v1 as core;
    use k8s_openapi::api::networking::v1 as networking;
    Some(match (res.group, res.kind) {
        ("", "Namespace") => typed::<core::Namespace>,
        ("", "Node") => typed::<core::Node>,
        ("", "Pod") => typed::<core::Pod>,
        ("", "ConfigMap") => typed::<core::ConfigMap>,
        ("", "Event") => typed::<core::Event>,
        ("networking.k8s.io", "NetworkPolicy") => typed::<networking::NetworkPolicy>,
        ("coordination.k8s.io", "Lease") => typed::<coordination::Lease>,
        ("policy.networking.k8s.io", "ClusterNetworkPolicy") => typed::<CustomObject>,
        _ => return None,
    })
}

/// Reads `obj` (its `kind` and `apiVersion` already the resource's) into the kind's typed form.
pub(crate) fn decode(res: &Resource, obj: &Value) -> Result<Decoded, TypeMismatch> {
    let Some(codec) = codec(res) else {
        return Ok(Decoded {
            typed: obj.clone(),
            pruned: obj.clone(),
            unknown: Vec::new(),
        });
    };
    let typed = codec(obj.clone())?;
    let mut unknown = Vec::new();
    let pruned = prune(obj, &typed, &mut String::new(), &mut unknown);
    Ok(Decoded {
        typed,
        pruned,
        unknown,
    })
}

/// `sent` less what `typed` dropped; the dropped fields' paths go to `unknown`. A field sent as
/// null is not a dropped field (it means "unset").
fn prune(sent: &Value, typed: &Value, path: &mut String, unknown: &mut Vec<String>) -> Value {
    match (sent, typed) {
        (Value::Object(s), Value::Object(t)) => {
            let mut out = Map::new();
            for (k, v) in s {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match t.get(k) {
                    Some(tv) => {
                        out.insert(k.clone(), prune(v, tv, path, unknown));
                    }
                    None if v.is_null() => {
                        out.insert(k.clone(), Value::Null);
                    }
                    None => unknown.push(path.clone()),
                }
                path.truncate(len);
            }
            Value::Object(out)
        }
        (Value::Array(s), Value::Array(t)) if s.len() == t.len() => Value::Array(
            s.iter()
                .zip(t)
                .enumerate()
                .map(|(i, (sv, tv))| {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    let v = prune(sv, tv, path, unknown);
                    path.truncate(len);
                    v
                })
                .collect(),
        ),
        _ => sent.clone(),
    }
}

fn unknown_text(unknown: &[String]) -> String {
    let list: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    format!("strict decoding error: {}", list.join(", "))
}

fn unknown_causes(unknown: &[String]) -> Vec<Cause> {
    unknown
        .iter()
        .map(|f| Cause {
            reason: "FieldValueInvalid",
            message: format!("strict decoding error: unknown field {f:?}"),
            field: f.clone(),
        })
        .collect()
}

/// Applies the request's `fieldValidation` to the dropped fields: `Err` carries the strict
/// decoding error's text and causes.
fn check_unknown(unknown: &[String], ctx: &Ctx) -> Result<(), (String, Vec<Cause>)> {
    if unknown.is_empty() {
        return Ok(());
    }
    match ctx.validation {
        FieldValidation::Ignore => Ok(()),
        FieldValidation::Warn => {
            for f in unknown {
                ctx.warnings.push(format!("unknown field {f:?}"));
            }
            Ok(())
        }
        FieldValidation::Strict => Err((unknown_text(unknown), unknown_causes(unknown))),
    }
}

fn cannot_handle(res: &Resource, why: &str, causes: Vec<Cause>) -> ApiError {
    let mut e = ApiError::bad_request(format!(
        "{kind} in version {version:?} cannot be handled as a {kind}: {why}",
        kind = res.kind,
        version = res.version
    ));
    e.causes = causes;
    e
}

/// A whole object sent by a create or an update: 400 BadRequest when it does not decode.
pub(crate) fn body(res: &Resource, obj: &Value, ctx: &Ctx) -> Result<Value, ApiError> {
    let d = decode(res, obj).map_err(|m| cannot_handle(res, &m.text(), vec![m.cause()]))?;
    check_unknown(&d.unknown, ctx).map_err(|(why, causes)| cannot_handle(res, &why, causes))?;
    Ok(d.typed)
}

/// An object as a patch left it: 422 Invalid when it does not decode.
pub(crate) fn patched(
    res: &Resource,
    name: &str,
    obj: &Value,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let d = decode(res, obj).map_err(|m| ApiError::invalid(res, name, vec![m.cause()]))?;
    check_unknown(&d.unknown, ctx).map_err(|(_, causes)| ApiError::invalid(res, name, causes))?;
    Ok(d.typed)
}

/// A server-side apply configuration: only pruned, since the typed form's zero values for the
/// fields it requires would claim fields the configuration does not set. kube-apiserver v1.26
/// answers such a configuration with a 500 ("failed to create typed patch object"); this server
/// says the same words with a 400 and honours `fieldValidation` as every other write does.
pub(crate) fn apply_config(
    res: &Resource,
    ns: &str,
    name: &str,
    obj: &Value,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let failed = |why: &str, causes: Vec<Cause>| {
        let mut e = ApiError::bad_request(format!(
            "failed to create typed patch object ({ns}/{name}; {}, Kind={}): {why}",
            res.api_version(),
            res.kind
        ));
        e.causes = causes;
        e
    };
    let d = decode(res, obj).map_err(|m| failed(&format!(".{}", m.text()), vec![m.cause()]))?;
    if ctx.validation == FieldValidation::Strict && !d.unknown.is_empty() {
        let why: Vec<String> = d
            .unknown
            .iter()
            .map(|f| format!(".{f}: field not declared in schema"))
            .collect();
        return Err(failed(&why.join(", "), unknown_causes(&d.unknown)));
    }
    check_unknown(&d.unknown, ctx).map_err(|(why, causes)| failed(&why, causes))?;
    Ok(d.pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{ALL, CONFIGMAPS, LEASES, PODS};
    use serde_json::json;

    #[test]
    fn every_served_kind_has_a_typed_form() {
        for r in ALL {
            assert!(
                codec(&r).is_some(),
                "{} has no typed form in decode::codec",
                r.kind
            );
        }
    }

    fn lease(spec: Value) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l"}, "spec": spec})
    }

    #[test]
    fn wrong_types_name_their_field() {
        let cases = [
            (
                &CONFIGMAPS,
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": 1}}),
                "data.a",
            ),
            (
                &LEASES,
                lease(json!({"leaseDurationSeconds": "forty"})),
                "spec.leaseDurationSeconds",
            ),
            (
                &LEASES,
                lease(json!({"leaseDurationSeconds": 1.5})),
                "spec.leaseDurationSeconds",
            ),
            (
                &LEASES,
                lease(json!({"leaseDurationSeconds": 99_999_999_999_i64})),
                "spec.leaseDurationSeconds",
            ),
            (
                &LEASES,
                lease(json!({"renewTime": "yesterday"})),
                "spec.renewTime",
            ),
            (&LEASES, lease(json!("no spec")), "spec"),
            (
                &PODS,
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                    "spec": {"containers": [{"name": "c", "ports": [{"containerPort": "80"}]}]}}),
                "spec.containers[0].ports[0].containerPort",
            ),
        ];
        for (res, obj, field) in cases {
            let e = decode(res, &obj).expect_err(&obj.to_string());
            assert_eq!(e.field, field, "{obj}: {e:?}");
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn unknown_fields_are_named_and_pruned() {
        let mut sent = lease(json!({"holderIdentity": "n", "foo": {"x": 1}, "gone": null}));
        sent["extra"] = json!(1);
        sent["metadata"]["labels"] = json!({"any": "key"});
        let d = decode(&LEASES, &sent).unwrap();
        assert_eq!(d.unknown, vec!["extra", "spec.foo"]);
        assert_eq!(
            d.pruned,
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "l", "labels": {"any": "key"}},
                "spec": {"holderIdentity": "n", "gone": null}})
        );
        assert!(d.typed["spec"].get("foo").is_none() && d.typed.get("extra").is_none());
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "i", "colour": "red"}]}});
        assert_eq!(
            decode(&PODS, &pod).unwrap().unknown,
            vec!["spec.containers[1].colour"]
        );
    }

    #[test]
    fn typed_form_is_what_the_go_types_write() {
        // A quantity sent as a number is a string; whole-second times lose nothing.
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p",
                "creationTimestamp": "2025-01-02T03:04:05Z"},
            "spec": {"containers": [{"name": "a", "image": "i", "resources": {"limits": {"cpu": 1}}}]}});
        let d = decode(&PODS, &pod).unwrap();
        assert_eq!(
            d.typed["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "1"
        );
        assert_eq!(
            d.typed["metadata"]["creationTimestamp"],
            "2025-01-02T03:04:05Z"
        );
        assert!(d.unknown.is_empty());
    }

    #[test]
    fn directives() {
        assert_eq!(FieldValidation::parse(None), Ok(FieldValidation::Warn));
        assert_eq!(
            FieldValidation::parse(Some("Strict")),
            Ok(FieldValidation::Strict)
        );
        assert!(FieldValidation::parse(Some("strict")).is_err());
    }
}
