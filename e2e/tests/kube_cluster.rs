//! Smoke test of the real Kubernetes cluster harness (`weft_e2e::kubecluster`):
//! Kubernetes v1.20.2 from Debian's source package on this machine, 2 nodes
//! (WEFT_KUBE_NODES overrides), no registry.
//!
//! A Deployment of 2 `weft-testapp http` replicas spread over the nodes, a
//! ClusterIP Service in front of them and a busybox client pod: the client reaches
//! the Service through kube-proxy's iptables rules, by address and by name (the
//! cluster DNS), the replicas reach each other
//! across nodes, `kubectl logs` and `kubectl exec` work, a pod's ServiceAccount
//! token authenticates, and no image was pulled. Then the cluster is torn down and
//! nothing of it may be left on the host.
//!
//! Needs root; fails (never skips) without it. The first run builds Kubernetes
//! (about 25 minutes, cached under ~/.cache/weft/kube).

use std::time::{Duration, Instant};
use weft_e2e::kubecluster::{poll, KubeCluster, APP_IMAGE, PAUSE_IMAGE};

const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: smoke}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: smoke}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: echo}}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: APP_IMAGE
        imagePullPolicy: Never
        command: [weft-testapp, http, --listen, "0.0.0.0:8080"]
        ports: [{containerPort: 8080}]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: smoke}
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: smoke, labels: {app: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: APP_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, "echo weft-smoke-client-started; exec sleep 3600"]
"#;

fn check<T>(c: &KubeCluster, what: &str, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:#}\n\ndaemon logs:\n{}", c.logs(25)),
    }
}

/// `kubectl exec` in a pod; retried a few times (a new endpoint takes a
/// moment to reach every kube-proxy).
fn exec_until(c: &KubeCluster, pod: &str, cmd: &[&str], want: &str) -> String {
    let mut args = vec!["-n", "smoke", "exec", pod, "--"];
    args.extend_from_slice(cmd);
    let mut last = String::new();
    let got = poll(Duration::from_secs(30), || match c.kubectl(&args) {
        Ok(out) if out.contains(want) => Some(out),
        Ok(out) => {
            last = out;
            None
        }
        Err(e) => {
            last = e.to_string();
            None
        }
    });
    got.unwrap_or_else(|| {
        panic!(
            "{pod}: {cmd:?} did not answer {want:?} within 30 s; last: {last}\n\ndaemon logs:\n{}",
            c.logs(25)
        )
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn kube_cluster_runs_pods_services_and_cleans_up() {
    weft_e2e::netlab::require_root();
    let t0 = Instant::now();
    let mut c = KubeCluster::start().unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    eprintln!(
        "cluster of {} node(s) Ready in {:.1} s (binaries cached; {:.1} s with the build check)",
        c.nodes.len(),
        c.startup.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    for (what, at) in &c.milestones {
        eprintln!("  {:>5.1} s  {what}", at.as_secs_f64());
    }
    eprintln!(
        "{}",
        check(
            &c,
            "kubectl get nodes",
            c.kubectl(&["get", "nodes", "-o", "wide"])
        )
    );

    // Workloads.
    let t_pods = Instant::now();
    check(
        &c,
        "applying the manifest",
        c.apply(&MANIFEST.replace("APP_IMAGE", APP_IMAGE)),
    );
    let echo = check(
        &c,
        "echo replicas",
        c.wait_pods_ready("smoke", "app=echo", 2, Duration::from_secs(120)),
    );
    check(
        &c,
        "client pod",
        c.wait_pods_ready("smoke", "app=client", 1, Duration::from_secs(120)),
    );
    eprintln!(
        "pods Ready {:.1} s after apply",
        t_pods.elapsed().as_secs_f64()
    );
    let ips: Vec<String> = echo
        .iter()
        .map(|p| {
            p["status"]["podIP"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let names: Vec<String> = echo
        .iter()
        .map(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let hosts: Vec<String> = echo
        .iter()
        .map(|p| {
            p["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    eprintln!("echo pods {names:?} at {ips:?} on {hosts:?}");
    if c.nodes.len() >= 2 {
        assert_ne!(
            hosts[0], hosts[1],
            "the replicas should be spread over two nodes"
        );
    }

    // The client reaches the Service through its ClusterIP (kube-proxy, iptables).
    // (busybox's `timeout`, not wget's -T: Debian's busybox-static 1.35 wget
    // segfaults on -T.)
    let cluster_ip = check(
        &c,
        "Service ClusterIP",
        c.kubectl(&[
            "-n",
            "smoke",
            "get",
            "service",
            "echo",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]),
    );
    assert!(cluster_ip.starts_with("10.97."), "ClusterIP {cluster_ip}");
    for i in 0..6 {
        let url = format!("http://{cluster_ip}/via-service/{i}");
        let body = exec_until(
            &c,
            "client",
            &["timeout", "5", "wget", "-qO-", &url],
            "GET /via-service",
        );
        assert_eq!(body.trim(), format!("GET /via-service/{i}"));
    }
    // The Service's environment variables were injected too.
    exec_until(
        &c,
        "client",
        &[
            "sh",
            "-c",
            "timeout 5 wget -qO- http://$ECHO_SERVICE_HOST:$ECHO_SERVICE_PORT/env",
        ],
        "GET /env",
    );
    // The Service's name, through the cluster DNS (the search list of the pod's
    // namespace), and its fully qualified name.
    for host in ["echo", "echo.smoke.svc.cluster.local"] {
        exec_until(
            &c,
            "client",
            &[
                "timeout",
                "5",
                "wget",
                "-qO-",
                &format!("http://{host}/by-name"),
            ],
            "GET /by-name",
        );
    }
    // Pod to pod, both ways between the replicas (across nodes with two).
    for (from, to_ip) in [(&names[0], &ips[1]), (&names[1], &ips[0])] {
        exec_until(
            &c,
            from,
            &[
                "timeout",
                "5",
                "wget",
                "-qO-",
                &format!("http://{to_ip}:8080/pod-to-pod"),
            ],
            "GET /pod-to-pod",
        );
    }
    // Client to each replica directly.
    for ip in &ips {
        exec_until(
            &c,
            "client",
            &[
                "timeout",
                "5",
                "wget",
                "-qO-",
                &format!("http://{ip}:8080/direct"),
            ],
            "GET /direct",
        );
    }

    // kubectl logs through the kubelet.
    let logs = check(
        &c,
        "kubectl logs",
        c.kubectl(&["-n", "smoke", "logs", "client"]),
    );
    assert!(logs.contains("weft-smoke-client-started"), "logs: {logs:?}");

    // The pod's ServiceAccount token (minted by the controller-manager) authenticates
    // as the pod's account, which RBAC gives no rights.
    let token = exec_until(
        &c,
        "client",
        &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"],
        ".",
    );
    let out = check(
        &c,
        "kubectl with the pod's token",
        c.kubectl_output(&["--token", token.trim(), "-n", "smoke", "get", "pods"]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("system:serviceaccount:smoke:default"),
        "the token should authenticate as smoke:default and be refused: {err}"
    );

    // The same token, from inside the pod, through the `kubernetes` Service's
    // ClusterIP to the API server on the host (TLS).
    exec_until(
        &c,
        "client",
        &[
            "sh",
            "-c",
            "timeout 5 wget -qO- --no-check-certificate \
             --header \"Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)\" \
             https://$KUBERNETES_SERVICE_HOST/version",
        ],
        "\"gitVersion\": \"v1.20.2\"",
    );
    // Nothing leaves the machine: an address off it is unreachable from a pod.
    let out = check(
        &c,
        "kubectl exec",
        c.kubectl_output(&[
            "-n",
            "smoke",
            "exec",
            "client",
            "--",
            "timeout",
            "5",
            "wget",
            "-qO-",
            "http://198.51.100.1/",
        ]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unreachable"),
        "a pod should have no route off the machine: {err}"
    );

    // Every node has the local images, and weft's when images/build made them.
    for i in 0..c.nodes.len() {
        let images = check(&c, "listing images", c.node_images(i));
        for want in [APP_IMAGE, PAUSE_IMAGE]
            .iter()
            .copied()
            .chain(c.weft_images.iter().map(String::as_str))
        {
            assert!(
                images.iter().any(|i| i == want),
                "{want} missing on {}: {images:?}",
                c.nodes[i].name
            );
        }
    }
    eprintln!("weft images imported: {:?}", c.weft_images);

    // Nothing was pulled: every image came from the local archives.
    for n in &c.nodes {
        let log = std::fs::read_to_string(c.dir.join(format!("logs/{}-containerd.log", n.name)))
            .unwrap_or_default();
        assert!(
            !log.contains("PullImage"),
            "{}: containerd was asked to pull an image",
            n.name
        );
    }

    let rss: u64 = c.daemon_pids().iter().map(|p| rss_kib(*p)).sum();
    eprintln!("daemons' RSS: {} MiB", rss / 1024);

    // Teardown restores the host.
    let t_down = Instant::now();
    let baseline = c.baseline().clone();
    let dir = c.dir.clone();
    c.teardown().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("teardown in {:.1} s", t_down.elapsed().as_secs_f64());
    let left = weft_e2e::kubecluster::host::leftovers(&dir, Some(&baseline));
    assert!(
        left.is_empty(),
        "left on the host after teardown:\n{}",
        left.join("\n")
    );
}
