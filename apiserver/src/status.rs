//! Kubernetes `Status` errors, rendered like kube-apiserver renders them.

use serde_json::{json, Map, Value};

use crate::resources::Resource;

/// One entry of `details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cause {
    pub reason: &'static str,
    pub message: String,
    pub field: String,
}

/// An API error: becomes a `Status` object with `code` as the HTTP status.
/// (Boxed, so that `Result<_, ApiError>` stays small.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError(Box<ErrorBody>);

impl std::ops::Deref for ApiError {
    type Target = ErrorBody;
    fn deref(&self) -> &ErrorBody {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ErrorBody {
        &mut self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub name: Option<String>,
    pub group: Option<String>,
    pub kind: Option<String>,
    pub causes: Vec<Cause>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self(Box::new(ErrorBody {
            code,
            reason,
            message: message.into(),
            name: None,
            group: None,
            kind: None,
            causes: Vec::new(),
        }))
    }

    fn about(mut self, res: &Resource, name: &str) -> Self {
        self.name = Some(name.to_string());
        if !res.group.is_empty() {
            self.group = Some(res.group.to_string());
        }
        self.kind = Some(res.name.to_string());
        self
    }

    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", res.qualified()),
        )
        .about(res, name)
    }

    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn already_exists(res: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", res.qualified()),
        )
        .about(res, name)
    }

    pub fn conflict(res: &Resource, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                res.qualified()
            ),
        )
        .about(res, name)
    }

    /// A 409 Conflict with only a message (server-side apply conflicts, preconditions).
    pub fn conflict_plain(message: impl Into<String>) -> Self {
        Self::new(409, "Conflict", message)
    }

    pub fn stale(res: &Resource, name: &str) -> Self {
        Self::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn invalid(res: &Resource, name: &str, causes: Vec<Cause>) -> Self {
        let list: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let joined = if list.len() == 1 {
            list.join("")
        } else {
            format!("[{}]", list.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {joined}", res.kind),
        );
        e.name = Some(name.to_string());
        if !res.group.is_empty() {
            e.group = Some(res.group.to_string());
        }
        e.kind = Some(res.kind.to_string());
        e.causes = causes;
        e
    }

    /// A 422 about the request's options (`PatchOptions.meta.k8s.io "" is invalid: ...`).
    pub fn invalid_options(kind: &str, causes: Vec<Cause>) -> Self {
        let list: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{kind}.meta.k8s.io \"\" is invalid: {}", list.join(", ")),
        );
        e.group = Some("meta.k8s.io".into());
        e.kind = Some(kind.to_string());
        e.causes = causes;
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn forbidden(res: &Resource, name: &str, why: &str) -> Self {
        Self::new(
            403,
            "Forbidden",
            format!("{} \"{name}\" is forbidden: {why}", res.qualified()),
        )
        .about(res, name)
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large_rv(requested: u64, current: u64) -> Self {
        let mut e = Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {current}"),
        );
        e.causes.push(Cause {
            reason: "ResourceVersionTooLarge",
            message: "Too large resource version".to_string(),
            field: String::new(),
        });
        e
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"),
        )
    }

    /// A request body in a serialization this server does not read (protobuf, CBOR).
    pub fn unsupported_media_type_body(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {content_type:?})"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut details = Map::new();
        if let Some(n) = &self.name {
            details.insert("name".into(), json!(n));
        }
        if let Some(g) = &self.group {
            details.insert("group".into(), json!(g));
        }
        if let Some(k) = &self.kind {
            details.insert("kind".into(), json!(k));
        }
        if !self.causes.is_empty() {
            let causes: Vec<Value> = self
                .causes
                .iter()
                .map(|c| {
                    let mut m = Map::new();
                    m.insert("reason".into(), json!(c.reason));
                    m.insert("message".into(), json!(c.message));
                    if !c.field.is_empty() {
                        m.insert("field".into(), json!(c.field));
                    }
                    Value::Object(m)
                })
                .collect();
            details.insert("causes".into(), Value::Array(causes));
        }
        let mut status = Map::new();
        status.insert("kind".into(), json!("Status"));
        status.insert("apiVersion".into(), json!("v1"));
        status.insert("metadata".into(), json!({}));
        status.insert("status".into(), json!("Failure"));
        status.insert("message".into(), json!(self.message));
        status.insert("reason".into(), json!(self.reason));
        if !details.is_empty() {
            status.insert("details".into(), Value::Object(details));
        }
        status.insert("code".into(), json!(self.code));
        Value::Object(status)
    }
}

/// A `FieldValueInvalid` cause.
pub(crate) fn invalid_value(field: &str, value: &str, why: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        message: format!("Invalid value: {value:?}: {why}"),
        field: field.to_string(),
    }
}

/// A `FieldValueRequired` cause.
pub(crate) fn required(field: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        message: "Required value".to_string(),
        field: field.to_string(),
    }
}

/// A `FieldValueForbidden` cause.
pub(crate) fn forbidden_field(field: &str, why: &str) -> Cause {
    Cause {
        reason: "FieldValueForbidden",
        message: format!("Forbidden: {why}"),
        field: field.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{NETWORK_POLICIES, PODS};

    #[test]
    fn not_found_matches_kube_apiserver() {
        let s = ApiError::not_found(&PODS, "x").to_status();
        assert_eq!(
            s,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message":"pods \"x\" not found","reason":"NotFound",
                "details":{"name":"x","kind":"pods"},"code":404})
        );
        let s = ApiError::not_found(&NETWORK_POLICIES, "p").to_status();
        assert_eq!(
            s["message"],
            "networkpolicies.networking.k8s.io \"p\" not found"
        );
        assert_eq!(s["details"]["group"], "networking.k8s.io");
    }

    #[test]
    fn conflict_and_invalid() {
        let s = ApiError::stale(&PODS, "x").to_status();
        assert_eq!(s["code"], 409);
        assert_eq!(s["reason"], "Conflict");
        assert!(s["message"]
            .as_str()
            .is_some_and(|m| m.contains("the object has been modified")));
        let s = ApiError::invalid(&PODS, "A", vec![invalid_value("metadata.name", "A", "bad")])
            .to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["kind"], "Pod");
        assert_eq!(s["details"]["causes"][0]["field"], "metadata.name");
        assert_eq!(
            s["message"],
            "Pod \"A\" is invalid: metadata.name: Invalid value: \"A\": bad"
        );
    }

    #[test]
    fn expired_has_no_details() {
        let s = ApiError::expired("too old resource version: 1 (5)").to_status();
        assert_eq!(s["code"], 410);
        assert_eq!(s["reason"], "Expired");
        assert!(s.get("details").is_none());
    }
}
