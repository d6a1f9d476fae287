//! Label selectors as the Kubernetes API defines them: `matchLabels` and `matchExpressions`
//! (`In`, `NotIn`, `Exists`, `DoesNotExist`) ANDed; an empty selector matches everything.
//! A requirement the API would reject (unknown operator) matches nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use std::collections::{BTreeMap, HashMap};

/// Labels of an object; `None` in the API is the empty map.
pub type Labels = BTreeMap<String, String>;

/// Objects (by index) under each `key=value` label they carry, so that a selector with
/// `matchLabels` is checked against the few objects that carry one of its pairs instead of all
/// of them (Calico's label index, in miniature). Kept up to date object by object.
#[derive(Debug, Default)]
pub struct LabelIndex {
    /// key → value → objects.
    by_pair: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl LabelIndex {
    pub fn new<'a>(objects: impl IntoIterator<Item = (usize, &'a Labels)>) -> Self {
        let mut index = Self::default();
        for (i, labels) in objects {
            index.insert(i, labels);
        }
        index
    }

    pub fn insert(&mut self, object: usize, labels: &Labels) {
        for (k, v) in labels {
            let values = match self.by_pair.get_mut(k.as_str()) {
                Some(values) => values,
                None => self.by_pair.entry(k.clone()).or_default(),
            };
            match values.get_mut(v.as_str()) {
                Some(list) => list.push(object),
                None => {
                    values.insert(v.clone(), vec![object]);
                }
            }
        }
    }

    /// Takes `object` out from under `labels` (the labels it was inserted with).
    pub fn remove(&mut self, object: usize, labels: &Labels) {
        for (k, v) in labels {
            let Some(values) = self.by_pair.get_mut(k.as_str()) else {
                continue;
            };
            if let Some(list) = values.get_mut(v.as_str()) {
                if let Some(at) = list.iter().position(|o| *o == object) {
                    list.swap_remove(at);
                }
                if list.is_empty() {
                    values.remove(v.as_str());
                }
            }
            if values.is_empty() {
                self.by_pair.remove(k.as_str());
            }
        }
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
    fn label_index_follows_inserts_and_removes() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let mut index = LabelIndex::new([(0, &web), (1, &db)]);
        index.insert(2, &web);
        let s = sel(&[("app", "web"), ("tier", "front")], vec![]);
        let mut hit = index.narrow(&s).unwrap().to_vec();
        hit.sort();
        assert_eq!(hit, [0, 2]);
        index.remove(0, &web);
        assert_eq!(index.narrow(&s).unwrap(), [2]);
        index.remove(2, &web);
        assert!(index.narrow(&s).unwrap().is_empty());
        assert!(
            !index.by_pair.contains_key("tier"),
            "emptied keys are dropped"
        );
        assert_eq!(index.narrow(&sel(&[("app", "db")], vec![])).unwrap(), [1]);
        assert!(index.narrow(&LabelSelector::default()).is_none());
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = sel(&[("app", "web")], vec![expr("tier", "In", &["back"])]);
        assert!(!matches(&s, &labels(&[("app", "web"), ("tier", "front")])));
        assert!(matches(&s, &labels(&[("app", "web"), ("tier", "back")])));
    }
}
