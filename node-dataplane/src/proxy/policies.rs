//! The node's compiled AuthorizationPolicies, indexed by the namespace they can apply
//! to, so that authorizing a connection or a request looks only at the mesh-wide
//! policies and those of the destination's namespace, however many policies the
//! rest of the mesh has.

use std::collections::HashMap;
use std::sync::Arc;
use weft_authz::CompiledPolicy;
use weft_proto::pb;

pub struct CompiledPolicies {
    all: Vec<CompiledPolicy>,
    /// Per namespace with policies of its own: indices into `all` of those and of
    /// the mesh-wide policies, in `all`'s order.
    by_namespace: HashMap<String, Vec<usize>>,
    /// Indices of the mesh-wide policies alone (namespaces without policies).
    mesh_wide: Vec<usize>,
}

impl CompiledPolicies {
    pub fn new(all: Vec<CompiledPolicy>) -> Self {
        let mut mesh_wide = Vec::new();
        let mut own: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, p) in all.iter().enumerate() {
            if p.mesh_wide {
                mesh_wide.push(i);
            } else {
                own.entry(p.namespace.clone()).or_default().push(i);
            }
        }
        // Merge each namespace's indices with the mesh-wide ones (both ascending).
        let by_namespace = own
            .into_iter()
            .map(|(ns, own)| {
                let mut merged = Vec::with_capacity(own.len() + mesh_wide.len());
                let (mut a, mut b) = (own.iter().peekable(), mesh_wide.iter().peekable());
                while let (Some(&&x), Some(&&y)) = (a.peek(), b.peek()) {
                    if x < y {
                        merged.push(x);
                        a.next();
                    } else {
                        merged.push(y);
                        b.next();
                    }
                }
                merged.extend(a.chain(b));
                (ns, merged)
            })
            .collect();
        Self {
            all,
            by_namespace,
            mesh_wide,
        }
    }

    /// The policies that apply to the workload `dst` (mesh-wide ones and those of
    /// its namespace whose selector matches its labels), in the policy set's order.
    pub fn applicable<'a>(
        &'a self,
        dst: &'a pb::Workload,
    ) -> impl Iterator<Item = &'a CompiledPolicy> + 'a {
        self.candidates(&dst.namespace)
            .iter()
            .map(|&i| &self.all[i])
            .filter(|p| p.applies_to_labels(&dst.namespace, &dst.labels))
    }

    /// Indices of the policies that can apply in `namespace`, before selectors.
    fn candidates(&self, namespace: &str) -> &[usize] {
        self.by_namespace.get(namespace).unwrap_or(&self.mesh_wide)
    }

    /// [`applicable`](Self::applicable), kept for reuse while this policy set is
    /// current (a connection's requests all go to the same workload).
    pub fn applicable_to(self: &Arc<Self>, dst: &pb::Workload) -> Applicable {
        let idx = self
            .candidates(&dst.namespace)
            .iter()
            .copied()
            .filter(|&i| self.all[i].applies_to_labels(&dst.namespace, &dst.labels))
            .collect();
        Applicable {
            policies: self.clone(),
            idx,
        }
    }
}

/// The policies of one policy set that apply to one workload.
pub struct Applicable {
    policies: Arc<CompiledPolicies>,
    idx: Vec<usize>,
}

impl Applicable {
    /// Was this computed from `policies` (the current set)?
    pub fn is_from(&self, policies: &Arc<CompiledPolicies>) -> bool {
        Arc::ptr_eq(&self.policies, policies)
    }

    pub fn iter(&self) -> impl Iterator<Item = &CompiledPolicy> + '_ {
        self.idx.iter().map(|&i| &self.policies.all[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_authz as authz;

    fn policy(ns: &str, name: &str, selector: &[(&str, &str)]) -> pb::AuthorizationPolicy {
        pb::AuthorizationPolicy {
            namespace: ns.into(),
            name: name.into(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mesh_wide: ns == "weft-system",
            ..Default::default()
        }
    }

    fn workload(ns: &str, labels: &[(&str, &str)]) -> pb::Workload {
        pb::Workload {
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    /// The index gives exactly what filtering every policy would, in the same order.
    #[test]
    fn applicable_policies_are_the_filtered_policy_set_in_order() {
        let set = [
            policy("shop", "a", &[]),
            policy("weft-system", "root", &[]),
            policy("bank", "b", &[("app", "web")]),
            policy("shop", "c", &[("app", "web")]),
            policy("weft-system", "root-web", &[("app", "web")]),
            policy("shop", "d", &[("app", "db")]),
        ];
        let all: Vec<_> = set.iter().map(authz::compile).collect();
        let names = |it: &mut dyn Iterator<Item = &CompiledPolicy>| -> Vec<String> {
            it.map(|p| p.name.clone()).collect()
        };
        let policies = Arc::new(CompiledPolicies::new(all.clone()));
        for (w, want) in [
            (
                workload("shop", &[("app", "web")]),
                vec!["a", "root", "c", "root-web"],
            ),
            (workload("shop", &[]), vec!["a", "root"]),
            (
                workload("bank", &[("app", "web")]),
                vec!["root", "b", "root-web"],
            ),
            (
                workload("other", &[("app", "web")]),
                vec!["root", "root-web"],
            ),
            (workload("other", &[]), vec!["root"]),
        ] {
            let brute = names(
                &mut all
                    .iter()
                    .filter(|p| p.applies_to_labels(&w.namespace, &w.labels)),
            );
            assert_eq!(brute, want, "{w:?}");
            assert_eq!(names(&mut policies.applicable(&w)), want, "{w:?}");
            assert_eq!(names(&mut policies.applicable_to(&w).iter()), want, "{w:?}");
        }
    }
}
