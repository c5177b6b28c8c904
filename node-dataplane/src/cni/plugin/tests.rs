use super::*;
use crate::cni::protocol::{EnrollmentHint, Response};
use std::os::unix::net::UnixListener;

fn env(cmd: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/p1"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn conf(socket: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "weft-cni",
        "agentSocket": socket,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}]
        }
    })
    .to_string()
}

/// A fake agent answering `n` requests with `resp`, recording what it got.
fn agent(
    dir: &Path,
    resp: Response,
    n: usize,
) -> (std::path::PathBuf, std::thread::JoinHandle<Vec<Request>>) {
    let sock = dir.join("cni.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let h = std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..n {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            r.read_line(&mut line).unwrap();
            got.push(serde_json::from_str(&line).unwrap());
            let mut w = s;
            w.write_all(format!("{}\n", serde_json::to_string(&resp).unwrap()).as_bytes())
                .unwrap();
        }
        got
    });
    (sock, h)
}

#[test]
fn version() {
    let o = run(&env("VERSION"), "");
    assert_eq!(o.exit_code, 0);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));
}

#[test]
fn add_tells_the_agent_and_passes_the_previous_result_through() {
    let d = tempfile::tempdir().unwrap();
    let (sock, h) = agent(
        d.path(),
        Response {
            ok: true,
            enrolled: true,
            error: String::new(),
        },
        2,
    );
    let input = conf(&sock);
    let o = run(&env("ADD"), &input);
    assert_eq!(o.exit_code, 0, "{}", o.stdout);
    let out: Value = serde_json::from_str(&o.stdout).unwrap();
    let prev: Value = serde_json::from_str::<Value>(&input).unwrap()["prevResult"].clone();
    assert_eq!(out, prev, "the previous result passes through unchanged");
    let o = run(&env("CHECK"), &input);
    assert_eq!(o.exit_code, 0);
    let got = h.join().unwrap();
    assert_eq!(got[0].command, Command::Add);
    assert_eq!(
        got[0].sandbox,
        Sandbox {
            container_id: "c1".into(),
            netns: "/var/run/netns/p1".into(),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: "web-1".into(),
            pod_uid: "u1".into(),
            ips: vec!["10.244.1.5".into()],
        }
    );
    assert_eq!(got[1].command, Command::Check);
}

#[test]
fn del_always_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let input = conf(&d.path().join("nobody-listens.sock"));
    let mut e = env("DEL");
    e.remove("CNI_NETNS");
    let o = run(&e, &input);
    assert_eq!(o.exit_code, 0);
    assert_eq!(o.stdout, "");
}

#[test]
fn bad_input_is_a_cni_error() {
    let o = run(&env("ADD"), "{not json");
    assert_eq!(o.exit_code, 1);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["code"], code::DECODE);
    assert!(v["msg"].as_str().unwrap().contains("decode"));

    let o = run(
        &env("ADD"),
        r#"{"cniVersion":"9.9.9","name":"x","type":"weft-cni"}"#,
    );
    assert_eq!(
        serde_json::from_str::<Value>(&o.stdout).unwrap()["code"],
        code::INCOMPATIBLE_VERSION
    );

    let o = run(
        &env("ADD"),
        r#"{"cniVersion":"1.0.0","name":"x","type":"weft-cni"}"#,
    );
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        v["code"],
        code::INVALID_CONFIG,
        "no prevResult: not chained"
    );

    let mut e = env("ADD");
    e.remove("CNI_CONTAINERID");
    let o = run(&e, &conf(Path::new("/nonexistent.sock")));
    assert_eq!(
        serde_json::from_str::<Value>(&o.stdout).unwrap()["code"],
        code::INVALID_ENV
    );

    let o = run(&env("FROB"), &conf(Path::new("/nonexistent.sock")));
    assert_eq!(
        serde_json::from_str::<Value>(&o.stdout).unwrap()["code"],
        code::INVALID_ENV
    );
}

#[test]
fn agent_down_lets_only_pods_known_to_be_outside_the_mesh_start() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("cni.sock"); // nobody listens
    let code_of = |o: &Outcome| serde_json::from_str::<Value>(&o.stdout).unwrap()["code"].clone();
    // No hint at all (the agent never synced): nothing is known, the ADD fails
    // with "try again later" (it used to pass, and the pod ran outside the mesh).
    let o = run(&env("ADD"), &conf(&sock));
    assert_eq!(o.exit_code, 1, "{}", o.stdout);
    assert_eq!(code_of(&o), code::TRY_AGAIN_LATER);
    let write = |hint: &EnrollmentHint| {
        std::fs::write(
            d.path().join("enrollment.json"),
            serde_json::to_string(hint).unwrap(),
        )
        .unwrap()
    };
    // A pod the agent said must be enrolled.
    write(&EnrollmentHint {
        enrolled_pods: vec!["shop/web-1".into()],
        ..Default::default()
    });
    let o = run(&env("ADD"), &conf(&sock));
    assert_eq!(o.exit_code, 1);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["code"], code::TRY_AGAIN_LATER);
    assert!(v["msg"].as_str().unwrap().contains("shop/web-1"));
    // A new pod of an enrolled namespace: fails too.
    write(&EnrollmentHint {
        namespaces: [("shop".to_string(), true)].into(),
        ..Default::default()
    });
    let o = run(&env("ADD"), &conf(&sock));
    assert_eq!(code_of(&o), code::TRY_AGAIN_LATER, "{}", o.stdout);
    // A pod of a namespace known to be outside the mesh starts.
    write(&EnrollmentHint {
        namespaces: [("shop".to_string(), false)].into(),
        ..Default::default()
    });
    let o = run(&env("ADD"), &conf(&sock));
    assert_eq!(o.exit_code, 0, "{}", o.stdout);
    // A hint file that is not one counts as no hint.
    std::fs::write(d.path().join("enrollment.json"), "{not json").unwrap();
    assert_eq!(run(&env("ADD"), &conf(&sock)).exit_code, 1);
}

#[test]
fn agent_refusal_fails_the_add() {
    let d = tempfile::tempdir().unwrap();
    let (sock, h) = agent(
        d.path(),
        Response {
            ok: false,
            enrolled: true,
            error: "netns gone".into(),
        },
        1,
    );
    let o = run(&env("ADD"), &conf(&sock));
    assert_eq!(o.exit_code, 1);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["details"], "netns gone");
    h.join().unwrap();
}

#[test]
fn cni_args_and_ips() {
    let a = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b");
    assert_eq!(a["K8S_POD_NAMESPACE"], "a");
    assert_eq!(a["K8S_POD_NAME"], "b");
    let r = json!({"ips": [{"address": "10.0.0.1/24"}, {"address": "fd00::1/64"}]});
    assert_eq!(ips_of(&r), vec!["10.0.0.1", "fd00::1"]);
}

/// Found by the `cni` fuzz target: an ADD whose prevResult is not an object (a list,
/// a number, null) printed that value as its result and succeeded; the runtime got
/// no CNI result at all. It is an invalid configuration, and nothing is asked.
#[test]
fn add_with_a_prev_result_that_is_not_an_object_is_refused() {
    for prev in ["[1, 2]", "null", "5", "\"x\""] {
        let stdin = format!(
            r#"{{"cniVersion":"1.0.0","name":"x","type":"weft-cni","agentSocket":"/nonexistent/cni.sock","prevResult":{prev}}}"#
        );
        let o = run(&env("ADD"), &stdin);
        assert_eq!(o.exit_code, 1, "prevResult {prev}: {}", o.stdout);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["code"], code::INVALID_CONFIG, "prevResult {prev}");
        assert!(
            v["msg"].as_str().unwrap().contains("prevResult"),
            "{}",
            v["msg"]
        );
    }
}
