//! Label selectors matched through an index built once per plan, so that selecting
//! costs in proportion to the candidates a selector's narrowest requirement leaves, not
//! to every object of the namespace: N Services each selecting one Pod among N in one
//! namespace plan in O(N), not O(N²).

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::state::selector_matches;

/// Labels of one object.
type Labels = BTreeMap<String, String>;

/// Objects (pods, or groups of pods) of one namespace, by label.
#[derive(Debug, Default)]
struct Namespace<'a> {
    /// Every object, in index order.
    all: Vec<usize>,
    /// Label key → the objects with that key.
    by_key: HashMap<&'a str, Key<'a>>,
}

/// The objects of a namespace that have one label key.
#[derive(Debug, Default)]
struct Key<'a> {
    /// Every one, in index order.
    all: Vec<usize>,
    /// Value → those with that value, in index order.
    by_value: HashMap<&'a str, Vec<usize>>,
}

impl Namespace<'_> {
    /// The objects labelled `key=value`.
    fn pair(&self, key: &str, value: &str) -> &[usize] {
        let list = self.by_key.get(key).and_then(|k| k.by_value.get(value));
        list.map_or(&[], Vec::as_slice)
    }

    /// The objects that have label `key`.
    fn with_key(&self, key: &str) -> &[usize] {
        self.by_key.get(key).map_or(&[], |k| k.all.as_slice())
    }
}

/// Objects with a namespace and labels, indexed by namespace and label. Objects are
/// named by their position in the sequence the index was built from.
#[derive(Debug)]
pub(super) struct LabelIndex<'a> {
    labels: Vec<&'a Labels>,
    namespaces: BTreeMap<&'a str, Namespace<'a>>,
    /// Candidates checked against a selector so far: the planner's selection cost.
    examined: Cell<u64>,
}

impl<'a> LabelIndex<'a> {
    /// Indexes `objects` (namespace, labels); object `i` is the `i`th of them.
    pub(super) fn new(objects: impl IntoIterator<Item = (&'a str, &'a Labels)>) -> Self {
        let mut index = Self {
            labels: Vec::new(),
            namespaces: BTreeMap::new(),
            examined: Cell::new(0),
        };
        for (i, (namespace, labels)) in objects.into_iter().enumerate() {
            index.labels.push(labels);
            let ns = index.namespaces.entry(namespace).or_default();
            ns.all.push(i);
            for (k, v) in labels {
                let key = ns.by_key.entry(k.as_str()).or_default();
                key.all.push(i);
                key.by_value.entry(v.as_str()).or_default().push(i);
            }
        }
        index
    }

    /// The namespaces that have objects, ordered by name.
    pub(super) fn namespaces(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.namespaces.keys().copied()
    }

    /// The objects of `namespace` that have every label of `selector` (a Service's
    /// `spec.selector`), in index order. An empty selector selects every object.
    pub(super) fn select_equal(&self, namespace: &str, selector: &Labels) -> Vec<usize> {
        let Some(ns) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        let narrowest = selector
            .iter()
            .map(|(k, v)| ns.pair(k, v))
            .min_by_key(|list| list.len());
        let candidates = narrowest.unwrap_or(&ns.all);
        self.check(candidates.iter().copied(), |labels| {
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
    }

    /// The objects of `namespace` that `selector` matches, in index order. Candidates
    /// come from the narrowest of the namespace's objects and its `matchLabels` pairs,
    /// `In` and `Exists` requirements (`NotIn` and `DoesNotExist` can only exclude).
    pub(super) fn select(&self, namespace: &str, selector: &LabelSelector) -> Vec<usize> {
        let Some(ns) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        // Candidates are borrowed from the index; only an `In` union that is narrower
        // than anything else is built, so a selector that also names a label most
        // objects carry costs no copy of that label's list.
        let mut narrowest: Cow<'_, [usize]> = Cow::Borrowed(&ns.all);
        for (k, v) in selector.match_labels.iter().flatten() {
            let list = ns.pair(k, v);
            if list.len() < narrowest.len() {
                narrowest = Cow::Borrowed(list);
            }
        }
        for req in selector.match_expressions.iter().flatten() {
            match req.operator.as_str() {
                "In" => {
                    let lists: Vec<&[usize]> = req
                        .values
                        .iter()
                        .flatten()
                        .map(|v| ns.pair(&req.key, v))
                        .collect();
                    if lists.iter().map(|l| l.len()).sum::<usize>() < narrowest.len() {
                        let mut union = lists.concat();
                        union.sort_unstable();
                        union.dedup();
                        narrowest = Cow::Owned(union);
                    }
                }
                "Exists" => {
                    let list = ns.with_key(&req.key);
                    if list.len() < narrowest.len() {
                        narrowest = Cow::Borrowed(list);
                    }
                }
                _ => {}
            }
        }
        self.check(narrowest.iter().copied(), |l| selector_matches(selector, l))
    }

    /// Candidates checks so far (see [`super::PlanCost`]).
    pub(super) fn examined(&self) -> u64 {
        self.examined.get()
    }

    fn check(
        &self,
        candidates: impl Iterator<Item = usize>,
        matches: impl Fn(&Labels) -> bool,
    ) -> Vec<usize> {
        let mut examined = 0;
        let selected = candidates
            .filter(|&i| {
                examined += 1;
                self.labels.get(i).is_some_and(|l| matches(l))
            })
            .collect();
        self.examined.set(self.examined.get() + examined);
        selected
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selects_like_a_full_scan_and_examines_only_candidates() {
        let objects = [
            ("a", labels(&[("app", "web"), ("tier", "front")])),
            ("a", labels(&[("app", "db")])),
            ("a", labels(&[("app", "web"), ("tier", "back")])),
            ("b", labels(&[("app", "web")])),
            ("a", labels(&[])),
        ];
        let index = LabelIndex::new(objects.iter().map(|(ns, l)| (*ns, l)));
        let sel =
            |match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>| LabelSelector {
                match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
                match_expressions: (!exprs.is_empty()).then_some(exprs),
            };
        let cases = [
            (sel(&[("app", "web")], vec![]), vec![0, 2]),
            (sel(&[("app", "web"), ("tier", "back")], vec![]), vec![2]),
            (sel(&[("app", "none")], vec![]), vec![]),
            (sel(&[], vec![]), vec![0, 1, 2, 4]),
            (
                sel(&[], vec![requirement("app", "In", &["db", "web"])]),
                vec![0, 1, 2],
            ),
            (
                sel(&[], vec![requirement("tier", "Exists", &[])]),
                vec![0, 2],
            ),
            (
                sel(&[], vec![requirement("app", "NotIn", &["web"])]),
                vec![1, 4],
            ),
            (
                sel(&[], vec![requirement("tier", "DoesNotExist", &[])]),
                vec![1, 4],
            ),
            (
                sel(
                    &[("app", "web")],
                    vec![requirement("tier", "NotIn", &["front"])],
                ),
                vec![2],
            ),
        ];
        for (selector, expected) in cases {
            assert_eq!(index.select("a", &selector), expected, "{selector:?}");
            let scan: Vec<usize> = (0..objects.len())
                .filter(|&i| objects[i].0 == "a" && selector_matches(&selector, &objects[i].1))
                .collect();
            assert_eq!(scan, expected, "the expectation itself, by full scan");
        }
        assert_eq!(index.select("c", &sel(&[], vec![])), Vec::<usize>::new());

        let before = index.examined();
        assert_eq!(
            index.select_equal("a", &labels(&[("tier", "back"), ("app", "web")])),
            vec![2]
        );
        assert_eq!(
            index.examined() - before,
            1,
            "only the narrowest list is checked"
        );
        assert_eq!(index.select_equal("a", &labels(&[])), vec![0, 1, 2, 4]);
        assert_eq!(index.namespaces().collect::<Vec<_>>(), ["a", "b"]);
    }
}
