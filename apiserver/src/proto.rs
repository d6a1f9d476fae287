//! A small reader of Kubernetes' protobuf request bodies (`application/vnd.kubernetes.protobuf`),
//! which kubectl's generators send (`kubectl create namespace|configmap`, `kubectl run`).
//!
//! Only the fields those commands set are mapped (from `k8s.io/api/core/v1/generated.proto`);
//! other fields are skipped. Zero values are dropped, like Go's `omitempty`.

use serde_json::{json, Map, Value};

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    Bool,
    Msg(&'static [F]),
    MapStr,
    MapBytes,
    MapQty,
    Time,
}

#[derive(Clone, Copy)]
struct F {
    num: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

const fn f(num: u64, name: &'static str, ty: Ty) -> F {
    F {
        num,
        name,
        ty,
        repeated: false,
    }
}

const fn r(num: u64, name: &'static str, ty: Ty) -> F {
    F {
        num,
        name,
        ty,
        repeated: true,
    }
}

const OWNER_REF: &[F] = &[
    f(1, "kind", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(5, "apiVersion", Ty::Str),
    f(6, "controller", Ty::Bool),
    f(7, "blockOwnerDeletion", Ty::Bool),
];

const OBJECT_META: &[F] = &[
    f(1, "name", Ty::Str),
    f(2, "generateName", Ty::Str),
    f(3, "namespace", Ty::Str),
    f(5, "uid", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "generation", Ty::Int),
    f(8, "creationTimestamp", Ty::Time),
    f(11, "labels", Ty::MapStr),
    f(12, "annotations", Ty::MapStr),
    r(13, "ownerReferences", Ty::Msg(OWNER_REF)),
    r(14, "finalizers", Ty::Str),
];

const CONFIG_MAP: &[F] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "data", Ty::MapStr),
    f(3, "binaryData", Ty::MapBytes),
    f(4, "immutable", Ty::Bool),
];

const NAMESPACE: &[F] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "spec", Ty::Msg(&[r(1, "finalizers", Ty::Str)])),
];

const CONTAINER_PORT: &[F] = &[
    f(1, "name", Ty::Str),
    f(2, "hostPort", Ty::Int),
    f(3, "containerPort", Ty::Int),
    f(4, "protocol", Ty::Str),
    f(5, "hostIP", Ty::Str),
];

const ENV_VAR: &[F] = &[f(1, "name", Ty::Str), f(2, "value", Ty::Str)];

const RESOURCES: &[F] = &[f(1, "limits", Ty::MapQty), f(2, "requests", Ty::MapQty)];

const VOLUME_MOUNT: &[F] = &[
    f(1, "name", Ty::Str),
    f(2, "readOnly", Ty::Bool),
    f(3, "mountPath", Ty::Str),
    f(4, "subPath", Ty::Str),
];

const CONTAINER: &[F] = &[
    f(1, "name", Ty::Str),
    f(2, "image", Ty::Str),
    r(3, "command", Ty::Str),
    r(4, "args", Ty::Str),
    f(5, "workingDir", Ty::Str),
    r(6, "ports", Ty::Msg(CONTAINER_PORT)),
    r(7, "env", Ty::Msg(ENV_VAR)),
    f(8, "resources", Ty::Msg(RESOURCES)),
    r(9, "volumeMounts", Ty::Msg(VOLUME_MOUNT)),
    f(13, "terminationMessagePath", Ty::Str),
    f(14, "imagePullPolicy", Ty::Str),
    f(16, "stdin", Ty::Bool),
    f(17, "stdinOnce", Ty::Bool),
    f(18, "tty", Ty::Bool),
    f(20, "terminationMessagePolicy", Ty::Str),
];

const TOLERATION: &[F] = &[
    f(1, "key", Ty::Str),
    f(2, "operator", Ty::Str),
    f(3, "value", Ty::Str),
    f(4, "effect", Ty::Str),
    f(5, "tolerationSeconds", Ty::Int),
];

const POD_SPEC: &[F] = &[
    r(2, "containers", Ty::Msg(CONTAINER)),
    f(3, "restartPolicy", Ty::Str),
    f(4, "terminationGracePeriodSeconds", Ty::Int),
    f(5, "activeDeadlineSeconds", Ty::Int),
    f(6, "dnsPolicy", Ty::Str),
    f(7, "nodeSelector", Ty::MapStr),
    f(8, "serviceAccountName", Ty::Str),
    f(9, "serviceAccount", Ty::Str),
    f(10, "nodeName", Ty::Str),
    f(11, "hostNetwork", Ty::Bool),
    r(15, "imagePullSecrets", Ty::Msg(&[f(1, "name", Ty::Str)])),
    f(16, "hostname", Ty::Str),
    f(17, "subdomain", Ty::Str),
    f(19, "schedulerName", Ty::Str),
    r(20, "initContainers", Ty::Msg(CONTAINER)),
    f(21, "automountServiceAccountToken", Ty::Bool),
    r(22, "tolerations", Ty::Msg(TOLERATION)),
    f(24, "priorityClassName", Ty::Str),
    f(30, "enableServiceLinks", Ty::Bool),
    f(31, "preemptionPolicy", Ty::Str),
];

const POD: &[F] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "spec", Ty::Msg(POD_SPEC)),
];

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or("truncated field")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
}

enum Raw<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn fields(b: &[u8]) -> Result<Vec<(u64, Raw<'_>)>, String> {
    let mut rd = Reader { b, pos: 0 };
    let mut out = Vec::new();
    while !rd.done() {
        let key = rd.varint()?;
        let raw = match key & 7 {
            0 => Raw::Varint(rd.varint()?),
            1 => {
                rd.take(8)?;
                Raw::Fixed
            }
            2 => {
                let n = usize::try_from(rd.varint()?).map_err(|_| "length too large")?;
                Raw::Bytes(rd.take(n)?)
            }
            5 => {
                rd.take(4)?;
                Raw::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push((key >> 3, raw));
    }
    Ok(out)
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, x)| acc | (u32::from(*x) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A map entry's key (1) and value (2).
fn entry(b: &[u8]) -> Result<(String, Option<&[u8]>), String> {
    let mut k = String::new();
    let mut v = None;
    for (num, raw) in fields(b)? {
        match (num, raw) {
            (1, Raw::Bytes(x)) => k = text(x)?,
            (2, Raw::Bytes(x)) => v = Some(x),
            _ => {}
        }
    }
    Ok((k, v))
}

fn decode(ty: Ty, raw: &Raw<'_>) -> Result<Option<Value>, String> {
    Ok(match (ty, raw) {
        (Ty::Str, Raw::Bytes(b)) => Some(json!(text(b)?)).filter(|v| v != ""),
        (Ty::Int, Raw::Varint(v)) => Some(json!(*v as i64)).filter(|v| v != 0),
        (Ty::Bool, Raw::Varint(v)) => (*v != 0).then_some(json!(true)),
        (Ty::Msg(schema), Raw::Bytes(b)) => Some(Value::Object(message(schema, b)?)),
        (Ty::Time, Raw::Bytes(b)) => {
            let secs = fields(b)?
                .iter()
                .find_map(|(n, r)| match (n, r) {
                    (1, Raw::Varint(v)) => Some(*v as i64),
                    _ => None,
                })
                .unwrap_or(0);
            jiff::Timestamp::from_second(secs)
                .ok()
                .filter(|_| secs != 0)
                .map(|t| json!(crate::objects::timestamp(t)))
        }
        _ => None,
    })
}

fn message(schema: &[F], b: &[u8]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (num, raw) in fields(b)? {
        let Some(fd) = schema.iter().find(|x| x.num == num) else {
            continue;
        };
        match fd.ty {
            Ty::MapStr | Ty::MapBytes | Ty::MapQty => {
                let Raw::Bytes(eb) = raw else { continue };
                let (k, v) = entry(eb)?;
                let v = v.unwrap_or_default();
                let value = match fd.ty {
                    Ty::MapStr => json!(text(v)?),
                    Ty::MapBytes => json!(base64(v)),
                    _ => {
                        // resource.Quantity: { string = 1 }
                        let q = fields(v)?.into_iter().find_map(|(n, r)| match (n, r) {
                            (1, Raw::Bytes(s)) => Some(s),
                            _ => None,
                        });
                        json!(text(q.unwrap_or_default())?)
                    }
                };
                if let Value::Object(m) = out.entry(fd.name).or_insert_with(|| json!({})) {
                    m.insert(k, value);
                }
            }
            ty => {
                let v = decode(ty, &raw)?;
                if fd.repeated {
                    let item = match (ty, v) {
                        (_, Some(v)) => v,
                        (Ty::Str, None) => json!(""),
                        (_, None) => continue,
                    };
                    if let Value::Array(a) = out.entry(fd.name).or_insert_with(|| json!([])) {
                        a.push(item);
                    }
                } else if let Some(v) = v {
                    out.insert(fd.name.to_string(), v);
                }
            }
        }
    }
    Ok(out)
}

/// Decodes a `k8s\0`-prefixed protobuf body into the JSON object it stands for.
pub(crate) fn decode_body(body: &[u8]) -> Result<Value, String> {
    let inner = body
        .strip_prefix(b"k8s\0")
        .ok_or("the protobuf body lacks the k8s magic prefix")?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (num, r) in fields(inner)? {
        match (num, r) {
            (1, Raw::Bytes(tm)) => {
                for (n, x) in fields(tm)? {
                    match (n, x) {
                        (1, Raw::Bytes(s)) => api_version = text(s)?,
                        (2, Raw::Bytes(s)) => kind = text(s)?,
                        _ => {}
                    }
                }
            }
            (2, Raw::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    let schema = match kind.as_str() {
        "ConfigMap" => CONFIG_MAP,
        "Namespace" => NAMESPACE,
        "Pod" => POD,
        other => {
            return Err(format!(
                "protobuf bodies of kind {other:?} are not supported; send JSON"
            ))
        }
    };
    let mut obj = message(schema, raw)?;
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(num: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![(num << 3 | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn decodes_a_config_map() {
        let meta = [
            ld(1, b"cfg"),
            ld(2, b""),
            ld(11, &[ld(1, b"app"), ld(2, b"web")].concat()),
        ]
        .concat();
        let cm = [
            ld(1, &meta),
            ld(2, &[ld(1, b"a"), ld(2, b"1")].concat()),
            ld(3, &[ld(1, b"b"), ld(2, b"hi")].concat()),
        ]
        .concat();
        let tm = [ld(1, b"v1"), ld(2, b"ConfigMap")].concat();
        let body = [b"k8s\0".to_vec(), ld(1, &tm), ld(2, &cm)].concat();
        let v = decode_body(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cfg", "labels": {"app": "web"}},
                "data": {"a": "1"}, "binaryData": {"b": "aGk="}})
        );
        assert!(decode_body(b"k8s\0\x0a\xff").is_err());
        assert!(decode_body(b"{}").is_err());
    }
}
