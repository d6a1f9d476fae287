//! Label selectors as the Kubernetes API defines them: `matchLabels` and `matchExpressions`
//! (`In`, `NotIn`, `Exists`, `DoesNotExist`) ANDed; an empty selector matches everything.
//! A requirement the API would reject (unknown operator) matches nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use std::collections::{BTreeMap, HashMap};

/// Labels of an object; `None` in the API is the empty map.
pub type Labels = BTreeMap<String, String>;

/// Objects (by index) under each `key=value` label they carry, so that a selector with
/// `matchLabels` is checked against the few objects that carry one of its pairs instead of all
/// of them (Calico's label index, in miniature).
#[derive(Debug, Default)]
pub struct LabelIndex<'a> {
    /// key → value → objects.
    by_pair: HashMap<&'a str, HashMap<&'a str, Vec<usize>>>,
}

impl<'a> LabelIndex<'a> {
    pub fn new(objects: impl IntoIterator<Item = (usize, &'a Labels)>) -> Self {
        let mut by_pair: HashMap<&'a str, HashMap<&'a str, Vec<usize>>> = HashMap::new();
        for (i, labels) in objects {
            for (k, v) in labels {
                by_pair
                    .entry(k.as_str())
                    .or_default()
                    .entry(v.as_str())
                    .or_default()
                    .push(i);
            }
        }
        Self { by_pair }
    }

    /// The objects `selector` may select (each still to be checked with [`matches`]): the
    /// shortest list of one of its `matchLabels` pairs; `None` when it has no `matchLabels`
    /// (any object may match).
    pub fn narrow(&self, selector: &LabelSelector) -> Option<&[usize]> {
        let pairs = selector.match_labels.as_ref().filter(|m| !m.is_empty())?;
        Some(
            pairs
                .iter()
                .map(|(k, v)| {
                    self.by_pair
                        .get(k.as_str())
                        .and_then(|values| values.get(v.as_str()))
                        .map_or(&[][..], Vec::as_slice)
                })
                .min_by_key(|list| list.len())
                .unwrap_or(&[]),
        )
    }
}

/// Whether `selector` selects an object with `labels`.
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && selector
            .match_expressions
            .iter()
            .flatten()
            .all(|req| requirement(req, labels))
}

fn requirement(req: &LabelSelectorRequirement, labels: &Labels) -> bool {
    let value = labels.get(&req.key);
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        other => {
            tracing::warn!(operator = other, key = %req.key, "unknown label selector operator matches nothing");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn sel(ml: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: (!ml.is_empty()).then(|| labels(ml)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        assert!(matches(&LabelSelector::default(), &labels(&[("a", "1")])));
    }

    #[test]
    fn match_labels_are_anded() {
        let s = sel(&[("a", "1"), ("b", "2")], vec![]);
        assert!(matches(&s, &labels(&[("a", "1"), ("b", "2"), ("c", "3")])));
        assert!(!matches(&s, &labels(&[("a", "1")])));
        assert!(!matches(&s, &labels(&[("a", "1"), ("b", "3")])));
    }

    #[test]
    fn expressions_table() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            (expr("app", "In", &["web", "db"]), true),
            (expr("app", "In", &["db"]), false),
            (expr("nope", "In", &["web"]), false),
            (expr("app", "NotIn", &["db"]), true),
            (expr("app", "NotIn", &["web"]), false),
            (expr("nope", "NotIn", &["web"]), true),
            (expr("app", "Exists", &[]), true),
            (expr("nope", "Exists", &[]), false),
            (expr("app", "DoesNotExist", &[]), false),
            (expr("nope", "DoesNotExist", &[]), true),
            (expr("app", "Bogus", &["web"]), false),
        ];
        for (req, want) in cases {
            assert_eq!(matches(&sel(&[], vec![req.clone()]), &l), want, "{req:?}");
        }
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = sel(&[("app", "web")], vec![expr("tier", "In", &["back"])]);
        assert!(!matches(&s, &labels(&[("app", "web"), ("tier", "front")])));
        assert!(matches(&s, &labels(&[("app", "web"), ("tier", "back")])));
    }
}
