//! AuthorizationPolicy compile and evaluate (weft-authz) from arbitrary input: the
//! policies and the connection are read from the line format of
//! `weft_fuzz::policy_text` (any bytes mean something).
//!
//! Properties, besides never panicking:
//! - evaluation is deterministic, and the decision does not depend on the order
//!   of the policies;
//! - a DENY policy that matches always denies, whatever else applies; one that
//!   does not compile denies everything; an ALLOW that does not compile allows
//!   nothing;
//! - AUDIT policies never change the decision; with no ALLOW policy, only a DENY
//!   can deny;
//! - never more permissive without the request than with it: allowed before the
//!   request is known (fail-closed) implies allowed for the request, and denied
//!   while the request is pending implies denied for the request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_authz::{compile, evaluate, Action, Attributes, CompiledPolicy, Decision};
use weft_fuzz::policy_text::Case;

fn decide(ps: &[CompiledPolicy], a: &Attributes) -> Decision {
    evaluate(ps.iter(), a)
}

fuzz_target!(|data: &[u8]| {
    let case = Case::parse(&String::from_utf8_lossy(data));
    if case.policies.len() > 64 {
        return;
    }
    let ps: Vec<CompiledPolicy> = case.policies.iter().map(compile).collect();
    let a = &case.attrs;

    let d = decide(&ps, a);
    let again: Vec<CompiledPolicy> = case.policies.iter().map(compile).collect();
    assert_eq!(decide(&again, a), d, "not deterministic");
    let mut reversed = ps.clone();
    reversed.reverse();
    assert_eq!(
        decide(&reversed, a).allowed,
        d.allowed,
        "depends on policy order"
    );

    let mut any_allow = false;
    for p in &ps {
        let hit = p.matching_rule(a);
        match p.action {
            Action::Deny => {
                if p.broken.is_some() {
                    assert!(hit.is_some(), "a broken DENY does not match");
                }
                if hit.is_some() {
                    assert!(!d.allowed, "{} matches and does not deny", p.id());
                }
            }
            Action::Allow => {
                any_allow = true;
                if p.broken.is_some() {
                    assert!(hit.is_none(), "a broken ALLOW matches");
                }
            }
            Action::Audit => {}
        }
        // Any policy, alone: a DENY decides only by matching.
        let alone = decide(std::slice::from_ref(p), a);
        match p.action {
            Action::Deny => assert_eq!(alone.allowed, hit.is_none()),
            Action::Allow => assert_eq!(alone.allowed, hit.is_some()),
            Action::Audit => assert!(alone.allowed),
        }
    }
    if !any_allow {
        let denied_by_deny = ps
            .iter()
            .any(|p| p.action == Action::Deny && p.matching_rule(a).is_some());
        assert_eq!(d.allowed, !denied_by_deny);
    }
    if d.allowed {
        assert!(
            d.policy.is_none()
                || ps
                    .iter()
                    .any(|p| p.action == Action::Allow && Some(p.id()) == d.policy.as_deref())
        );
    }
    let no_audit: Vec<CompiledPolicy> = ps
        .iter()
        .filter(|p| p.action != Action::Audit)
        .cloned()
        .collect();
    assert_eq!(
        decide(&no_audit, a).allowed,
        d.allowed,
        "an AUDIT policy changed the decision"
    );

    if a.request.is_some() {
        let closed = Attributes {
            request: None,
            l7_pending: false,
            ..a.clone()
        };
        let pending = Attributes {
            request: None,
            l7_pending: true,
            ..a.clone()
        };
        if decide(&ps, &closed).allowed {
            assert!(d.allowed, "allowed before the request, denied with it");
        }
        if !decide(&ps, &pending).allowed {
            assert!(!d.allowed, "denied while pending, allowed with the request");
        }
    }
});
