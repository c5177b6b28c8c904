//! The CNI plugin (node-dataplane `cni/plugin`) on an arbitrary environment and
//! stdin, with a stand-in for the node agent (nothing is dialled or read).
//!
//! Input: text; lines up to the first empty line are the environment (`K=V`),
//! the rest is stdin. The line `AGENT=...` sets the stand-in agent instead:
//! `ok`, `refuse:<error>`, or `down:<ns/pod>,<ns/pod>;<ns>,<ns>` (unreachable,
//! with the pods its enrollment hint lists, then the namespaces it knows to be
//! outside the mesh); without one the agent is down, hint empty.
//!
//! Properties, besides never panicking:
//! - stdout is empty or one JSON object; the exit code is 0 or 1; a failure
//!   carries a CNI error (`cniVersion`, numeric `code`, `msg`);
//! - VERSION always succeeds with the supported versions;
//! - ADD succeeds only if the agent accepted the pod, or could not be reached and
//!   its hint knows the pod's namespace to be outside the mesh (and does not list
//!   the pod): a pod that may have to be in the mesh never starts unenforced; and
//!   then it prints the previous result unchanged but for its `cniVersion`;
//! - the agent is asked about the container and pod the runtime named, with the
//!   previous result's addresses;
//! - DEL never fails once its configuration is readable (the runtime would retry
//!   it forever).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::collections::HashMap;
use weft_node_dataplane::fuzzing::{cni_run, FakeAgent, CNI_VERSIONS};

fn agent(spec: Option<&str>) -> FakeAgent {
    match spec {
        Some("ok") => FakeAgent::Answers {
            ok: true,
            error: String::new(),
        },
        Some(s) if s.starts_with("refuse:") => FakeAgent::Answers {
            ok: false,
            error: s["refuse:".len()..].to_string(),
        },
        Some(s) if s.starts_with("down:") => {
            let (pods, outside) = s["down:".len()..].split_once(';').unwrap_or((&s[5..], ""));
            FakeAgent::Unreachable {
                enrolled_pods: pods.split(',').map(str::to_owned).collect(),
                outside_namespaces: outside.split(',').map(str::to_owned).collect(),
            }
        }
        _ => FakeAgent::Unreachable {
            enrolled_pods: Vec::new(),
            outside_namespaces: Vec::new(),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (head, stdin) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut env: HashMap<String, String> = HashMap::new();
    let mut spec = None;
    for line in head.lines() {
        if let Some((k, v)) = line.split_once('=') {
            if k == "AGENT" {
                spec = Some(v);
            } else {
                env.insert(k.to_string(), v.to_string());
            }
        }
    }
    let fake = agent(spec);
    let out = cni_run(&env, stdin, fake.clone());

    assert!(
        out.exit_code == 0 || out.exit_code == 1,
        "exit code {}",
        out.exit_code
    );
    let printed: Option<Value> = (!out.stdout.is_empty()).then(|| {
        let v: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", out.stdout));
        assert!(v.is_object(), "stdout is not an object: {v}");
        v
    });
    if out.exit_code == 1 {
        let e = printed.as_ref().expect("a failure prints a CNI error");
        assert!(
            e["code"].is_u64() && e["msg"].is_string() && e["cniVersion"].is_string(),
            "{e}"
        );
    }
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        assert_eq!(out.exit_code, 0);
        let v = printed.expect("VERSION prints");
        let listed: Vec<&str> = v["supportedVersions"]
            .as_array()
            .expect("supportedVersions")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(listed, CNI_VERSIONS);
        return;
    }
    let conf: Option<Value> = serde_json::from_str(stdin).ok();
    let version = conf
        .as_ref()
        .and_then(|c| c.get("cniVersion"))
        .and_then(Value::as_str)
        .filter(|v| CNI_VERSIONS.contains(v));
    if let Some(asked) = &out.asked {
        assert!(
            version.is_some(),
            "the agent was asked about an unsupported configuration"
        );
        assert_eq!(asked.command, command);
        assert_eq!(Some(&asked.container_id), env.get("CNI_CONTAINERID"));
        assert!(!asked.container_id.is_empty());
        // CNI_ARGS is `K=V;K=V`, trimmed, the last of a key counting.
        let args = env.get("CNI_ARGS").cloned().unwrap_or_default();
        let arg = |key: &str| {
            args.split(';')
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| k.trim() == key)
                .last()
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            asked.pod,
            format!("{}/{}", arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME"))
        );
        // Each address the agent gets is one of prevResult's, without its prefix length.
        let prev_addresses: Vec<&str> = conf
            .as_ref()
            .and_then(|c| c["prevResult"]["ips"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .collect();
        for ip in &asked.ips {
            assert!(
                prev_addresses
                    .iter()
                    .any(|a| a.split('/').next() == Some(ip.as_str())),
                "{ip:?} is none of prevResult's {prev_addresses:?}"
            );
        }
    }
    match command {
        "ADD" if out.exit_code == 0 => {
            let asked = out
                .asked
                .as_ref()
                .expect("ADD succeeded without asking the agent");
            match &fake {
                FakeAgent::Answers { ok, .. } => {
                    assert!(ok, "ADD succeeded though the agent refused")
                }
                FakeAgent::Unreachable {
                    enrolled_pods,
                    outside_namespaces,
                } => {
                    // The namespace as the plugin reads it (it may hold a slash).
                    let args = env.get("CNI_ARGS").cloned().unwrap_or_default();
                    let ns = args
                        .split(';')
                        .filter_map(|kv| kv.split_once('='))
                        .filter(|(k, _)| k.trim() == "K8S_POD_NAMESPACE")
                        .last()
                        .map(|(_, v)| v.trim().to_string())
                        .unwrap_or_default();
                    assert!(
                        !enrolled_pods.contains(&asked.pod)
                            && outside_namespaces.iter().any(|n| *n == ns),
                        "pod {} may have to be in the mesh but started with the agent down",
                        asked.pod
                    )
                }
            }
            let printed = printed.expect("ADD prints its result");
            let prev = conf
                .as_ref()
                .and_then(|c| c.get("prevResult"))
                .expect("prevResult");
            assert_eq!(printed["cniVersion"].as_str(), version);
            if let (Some(p), Some(o)) = (prev.as_object(), printed.as_object()) {
                let strip = |m: &serde_json::Map<String, Value>| {
                    let mut m = m.clone();
                    m.remove("cniVersion");
                    m
                };
                assert_eq!(strip(o), strip(p), "the previous result was changed");
            }
        }
        "DEL" if version.is_some() && !env.get("CNI_CONTAINERID").is_none_or(String::is_empty) => {
            assert_eq!(out.exit_code, 0, "DEL failed: {}", out.stdout);
        }
        _ => {}
    }
});
