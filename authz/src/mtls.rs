//! Which PeerAuthentication mode applies to a connection to a workload's port, with
//! Istio's precedence: the workload's own policy (selector matching its labels, in
//! its namespace; its port-level mode first) over the namespace's policy (no
//! selector) over the mesh's (root namespace, no selector). A level whose mode is
//! UNSET inherits from the next; when several policies apply at one level, the
//! oldest wins (then the first by name). Without any, the mode is PERMISSIVE.

use weft_proto::pb::peer_authentication::MtlsMode;
use weft_proto::pb::{PeerAuthentication, Workload};

/// The mode in force for one port of a workload, and the policy that set it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effective<'a> {
    /// PERMISSIVE or STRICT (DISABLE is enforced as PERMISSIVE, UNSET resolves).
    pub strict: bool,
    /// The policy whose mode decided; `None`: the mesh's default (PERMISSIVE).
    pub policy: Option<&'a PeerAuthentication>,
}

impl Effective<'_> {
    /// `namespace/name` of the deciding policy.
    pub fn policy_id(&self) -> Option<String> {
        self.policy.map(|p| format!("{}/{}", p.namespace, p.name))
    }
}

fn selects(p: &PeerAuthentication, labels: &std::collections::BTreeMap<String, String>) -> bool {
    p.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Oldest first, then by name: the one that wins at a level.
fn oldest<'a>(it: impl Iterator<Item = &'a PeerAuthentication>) -> Option<&'a PeerAuthentication> {
    it.min_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)))
}

fn mode_of(m: i32) -> MtlsMode {
    MtlsMode::try_from(m).unwrap_or(MtlsMode::Unset)
}

/// The mode for a connection to `port` of `dst`, from `policies` (any set: those
/// of other namespaces or not selecting `dst` are ignored).
pub fn effective<'a>(
    policies: impl IntoIterator<Item = &'a PeerAuthentication>,
    dst: &Workload,
    port: u16,
) -> Effective<'a> {
    let policies: Vec<&PeerAuthentication> = policies.into_iter().collect();
    let in_ns = || {
        policies
            .iter()
            .copied()
            .filter(|p| p.namespace == dst.namespace)
    };
    let workload = oldest(in_ns().filter(|p| !p.selector.is_empty() && selects(p, &dst.labels)));
    let namespace = oldest(in_ns().filter(|p| p.selector.is_empty()));
    let mesh = oldest(
        policies
            .iter()
            .copied()
            .filter(|p| p.mesh_wide && p.selector.is_empty()),
    );
    let port_level =
        workload.and_then(|p| p.port_modes.get(&u32::from(port)).map(|m| (p, mode_of(*m))));
    let levels = port_level.into_iter().chain(
        [workload, namespace, mesh]
            .into_iter()
            .flatten()
            .map(|p| (p, mode_of(p.mode))),
    );
    for (p, m) in levels {
        match m {
            MtlsMode::Unset => continue,
            MtlsMode::Strict => {
                return Effective {
                    strict: true,
                    policy: Some(p),
                }
            }
            MtlsMode::Permissive | MtlsMode::Disable => {
                return Effective {
                    strict: false,
                    policy: Some(p),
                }
            }
        }
    }
    Effective {
        strict: false,
        policy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        mode: MtlsMode,
        ports: &[(u32, MtlsMode)],
        created: i64,
    ) -> PeerAuthentication {
        PeerAuthentication {
            name: name.into(),
            namespace: ns.into(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mode: mode as i32,
            port_modes: ports.iter().map(|(p, m)| (*p, *m as i32)).collect(),
            mesh_wide: ns == "weft-system" && selector.is_empty(),
            created,
        }
    }

    fn db() -> Workload {
        Workload {
            name: "db-0".into(),
            namespace: "shop".into(),
            labels: [("app".to_string(), "db".to_string())].into(),
            ..Default::default()
        }
    }

    fn decide(ps: &[PeerAuthentication], port: u16) -> (bool, Option<String>) {
        let e = effective(ps, &db(), port);
        (e.strict, e.policy_id())
    }

    use MtlsMode::{Disable, Permissive, Strict, Unset};

    #[test]
    fn no_policy_is_permissive() {
        assert_eq!(decide(&[], 5432), (false, None));
    }

    #[test]
    fn workload_over_namespace_over_mesh() {
        let mesh = pa("weft-system", "mesh", &[], Strict, &[], 1);
        let ns = pa("shop", "ns", &[], Permissive, &[], 2);
        let wl = pa("shop", "db", &[("app", "db")], Strict, &[], 3);
        assert_eq!(
            decide(std::slice::from_ref(&mesh), 1),
            (true, Some("weft-system/mesh".into()))
        );
        assert_eq!(
            decide(&[mesh.clone(), ns.clone()], 1),
            (false, Some("shop/ns".into()))
        );
        assert_eq!(decide(&[mesh, ns, wl], 1), (true, Some("shop/db".into())));
    }

    #[test]
    fn unset_inherits_and_port_level_overrides() {
        let ns = pa("shop", "ns", &[], Strict, &[], 1);
        let wl = pa(
            "shop",
            "db",
            &[("app", "db")],
            Unset,
            &[(9090, Permissive), (9091, Unset)],
            2,
        );
        let ps = [ns, wl];
        assert_eq!(decide(&ps, 5432), (true, Some("shop/ns".into())));
        assert_eq!(decide(&ps, 9090), (false, Some("shop/db".into())));
        assert_eq!(decide(&ps, 9091), (true, Some("shop/ns".into())));
    }

    #[test]
    fn disable_is_permissive() {
        let ns = pa("shop", "ns", &[], Disable, &[], 1);
        assert_eq!(decide(&[ns], 1), (false, Some("shop/ns".into())));
    }

    #[test]
    fn scope_other_namespaces_and_selectors_ignored() {
        let other_ns = pa("web", "ns", &[], Strict, &[], 1);
        let other_app = pa("shop", "web", &[("app", "web")], Strict, &[], 1);
        // A root-namespace policy with a selector is not mesh-wide.
        let root_sel = pa("weft-system", "sel", &[("app", "db")], Strict, &[], 1);
        assert_eq!(decide(&[other_ns, other_app, root_sel], 1), (false, None));
    }

    #[test]
    fn oldest_wins_at_a_level() {
        let newer = pa("shop", "a-newer", &[], Permissive, &[], 20);
        let older = pa("shop", "z-older", &[], Strict, &[], 10);
        assert_eq!(
            decide(&[newer.clone(), older.clone()], 1),
            (true, Some("shop/z-older".into()))
        );
        let same_age = pa("shop", "b", &[], Strict, &[], 20);
        assert_eq!(
            decide(&[same_age, newer], 1),
            (false, Some("shop/a-newer".into()))
        );
    }
}
