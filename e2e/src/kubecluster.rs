//! A real Kubernetes cluster on this machine: Kubernetes v1.20.2 built from
//! Debian's source package (`e2e/kube/build-kube.sh`, cached under
//! ~/.cache/weft/kube), Debian's etcd, containerd, runc and CNI plugins. No
//! container engine, no registry, nothing leaves the machine.
//!
//! ```text
//!  host netns:  etcd (loopback), kube-apiserver (10.201.0.1:6443), controller-manager, scheduler
//!               bridge weftkube0 10.201.0.1/24, routes to each node's pod CIDR via its node IP
//!     |-- veth --> netns weft-kube-node-N (eth0 10.201.0.1N), own mount namespace:
//!                  containerd (own config, socket, root, state), kubelet, kube-proxy (iptables)
//!                  pods: Debian's bridge (cni0) + host-local, 10.245.N.0/24
//! ```
//!
//! Each node runs in its own network namespace *and* its own mount namespace: the
//! kubelet and containerd write to fixed host paths whatever they are told
//! (/var/log/pods, /var/lib/kubelet/device-plugins, /run/containerd/s, /var/lib/cni),
//! and a kubelet deletes the /var/log/pods directories of pods it does not know
//! (kuberuntime_gc.go evictPodLogsDirectories), so two nodes must not share them.
//! Each node's mount namespace binds its own directories there, and binds files of
//! its own over the sysctls the kubelet sets at start (vm.overcommit_memory,
//! kernel.panic, kernel.panic_on_oops, ...): the host's values never change.
//!
//! Nothing leaves the machine: the nodes' namespaces have no default route (only
//! the fabric, the other nodes' pod CIDRs and the Service CIDR); the kubelet runs
//! with `AWS_EC2_METADATA_DISABLED=true`; the API server reaches kubelets by
//! InternalIP; images are imported into containerd with `ctr` (the sandbox image
//! too) and pods use `imagePullPolicy: Never`; pods get a resolv.conf that points
//! at their own loopback.
//!
//! Teardown ([`KubeCluster::teardown`], also on drop) kills every process by PID
//! (read from the cluster's cgroups, see [`host`]), lets the nodes' mount and
//! network namespaces go, removes the bridge, cgroups, mount points and directory,
//! restores any sysctl that changed, and returns what it could not undo.
//! [`KubeCluster::start`] first cleans what a killed run left.

pub mod dns;
pub mod host;
pub mod pki;

use crate::process::{free_port, Proc};
use anyhow::{bail, Context};
use host::Baseline;
use serde_json::Value;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where a cluster keeps its state (fixed, so a run that died is found).
pub const DEFAULT_DIR: &str = "/tmp/weft-kube";
/// Only one cluster runs at a time on a host; this lock says which.
const LOCK_FILE: &str = "/tmp/weft-kube.lock";
/// The host's address on the fabric bridge; the API server listens here.
pub const GATEWAY: &str = "10.201.0.1";
pub const APISERVER_PORT: u16 = 6443;
/// Pods: node N gets 10.245.N.0/24.
pub const CLUSTER_CIDR: &str = "10.245.0.0/16";
pub const SERVICE_CIDR: &str = "10.97.0.0/16";
/// The ClusterIP of `default/kubernetes`.
pub const KUBERNETES_SERVICE_IP: &str = "10.97.0.1";
/// The sandbox image (e2e/kube/pause.c), imported on every node.
pub const PAUSE_IMAGE: &str = "docker.io/weft-e2e/pause:1";
/// busybox (every applet in /bin) and /usr/local/bin/weft-testapp.
pub const APP_IMAGE: &str = "docker.io/weft-e2e/app:1";
/// Where `images/build` leaves weft's images (imported when present).
const WEFT_IMAGE_REPOSITORY: &str = "ghcr.io/weft-mesh";
const ADMIN_TOKEN: &str = "weft-e2e-kube-admin";
const CLEAN_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to build a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of nodes (each its own network and mount namespace, containerd and
    /// kubelet). Default: `WEFT_KUBE_NODES` or 2.
    pub nodes: usize,
    /// State directory. Default: `WEFT_KUBE_DIR` or /tmp/weft-kube.
    pub dir: PathBuf,
    /// Import target/images/weft-{node,control-plane}-<tag>.oci.tar (made by
    /// `images/build`) when they exist. Default: true.
    pub weft_images: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: std::env::var("WEFT_KUBE_NODES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
            dir: std::env::var_os("WEFT_KUBE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)),
            weft_images: true,
        }
    }
}

/// One node: a network namespace on the fabric, a mount namespace, containerd,
/// kubelet and kube-proxy.
pub struct KubeNode {
    pub name: String,
    pub index: usize,
    /// The node's InternalIP (on the fabric bridge).
    pub ip: String,
    pub pod_cidr: String,
    /// Network namespace name (`/run/netns/<netns>`).
    pub netns: String,
    pub dir: PathBuf,
    /// The process that holds the node's mount namespace.
    holder: Option<Proc>,
    containerd: Option<Proc>,
    kubelet: Option<Proc>,
    proxy: Option<Proc>,
}

impl KubeNode {
    /// containerd's socket (for `ctr --address`).
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// The node's CNI configuration directory: `/etc/cni/net.d` inside the node
    /// (containerd's `conf_dir`), this directory seen from the host.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }

    /// The node's CNI plugin directory: `/opt/cni/bin` inside the node
    /// (containerd's `bin_dir`), with links to Debian's plugins in /usr/lib/cni.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }

    /// What the node has at `path` (one of [`host::PRIVATE_PATHS`]), seen from the
    /// host: e.g. `/run/weft` inside node-1 is `<dir>/node-1/private/run_weft`.
    pub fn private_dir(&self, path: &str) -> PathBuf {
        match path {
            "/var/lib/kubelet" => self.kubelet_root(),
            "/etc/cni/net.d" => self.cni_conf_dir(),
            "/opt/cni/bin" => self.cni_bin_dir(),
            p => self
                .dir
                .join("private")
                .join(p.trim_start_matches('/').replace('/', "_")),
        }
    }

    /// A path inside the node's mount namespace (e.g. its bpffs at /sys/fs/bpf),
    /// seen from the host through the namespace holder's root; `None` when the
    /// node is not running.
    pub fn path_inside(&self, path: &str) -> Option<PathBuf> {
        self.holder.as_ref().map(|p| {
            PathBuf::from(format!(
                "/proc/{}/root/{}",
                p.pid(),
                path.trim_start_matches('/')
            ))
        })
    }

    /// The kubelet's root directory.
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    /// `/proc/<pid>/ns/mnt` of the node's mount namespace, while it runs.
    pub fn mount_ns(&self) -> Option<PathBuf> {
        self.holder
            .as_ref()
            .map(|p| PathBuf::from(format!("/proc/{}/ns/mnt", p.pid())))
    }

    fn procs(&self) -> impl Iterator<Item = &Proc> {
        [&self.holder, &self.containerd, &self.kubelet, &self.proxy]
            .into_iter()
            .flatten()
    }
}

pub struct KubeCluster {
    pub dir: PathBuf,
    /// kube-* binaries and kubectl.
    pub bins: PathBuf,
    pub nodes: Vec<KubeNode>,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    controller_manager: Option<Proc>,
    scheduler: Option<Proc>,
    baseline: Baseline,
    daemons_cgroup: PathBuf,
    /// How long [`start`](Self::start) took, builds excluded.
    pub startup: Duration,
    /// When each step of the start finished (since the start, builds excluded).
    pub milestones: Vec<(String, Duration)>,
    /// weft's images imported on every node from target/images (e.g.
    /// `ghcr.io/weft-mesh/weft-node:0.1.0`); empty when `images/build` has not run.
    pub weft_images: Vec<String>,
    /// The cluster DNS (kubelets' `clusterDNS`), see [`dns`].
    pub dns: Option<dns::ClusterDns>,
    t0: Instant,
    torn_down: bool,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Builds (once, cached) the Kubernetes binaries and installs the run-time
/// packages; returns the directory with kube-apiserver, kube-controller-manager,
/// kube-scheduler, kubelet, kube-proxy and kubectl.
pub fn kube_binaries() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/build-kube.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); see its output above",
            script.display(),
            out.status
        );
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "kubectl",
    ] {
        if !dir.join(b).is_file() {
            bail!("{} printed {dir:?}, which has no {b}", script.display());
        }
    }
    Ok(dir)
}

/// Takes the host-wide cluster lock, waiting up to `timeout` for another cluster
/// (another test binary) to finish.
fn lock(timeout: Duration) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("opening {LOCK_FILE}"))?;
    let end = Instant::now() + timeout;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((file, _)) => f = file,
        }
        if Instant::now() > end {
            bail!("another Kubernetes cluster holds {LOCK_FILE} for more than {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Calls `f` every 250 ms until it returns `Some` or `timeout` passes (kubectl
/// and ctr are whole processes: polling them faster only costs CPU).
pub fn poll<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    crate::process::poll_every(Duration::from_millis(250), timeout, f)
}

/// The last `n` lines of a file.
pub fn tail_file(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn proc_tail(p: &Option<Proc>, n: usize) -> String {
    match p {
        Some(p) => format!(
            "--- {} ({}), last {n} lines:\n{}",
            p.name,
            p.log.display(),
            tail_file(&p.log, n)
        ),
        None => String::new(),
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A kubeconfig for `server`, authenticated by a client certificate or a token.
fn kubeconfig(ca: &Path, user: &str, auth: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: weft-e2e\n  cluster:\n    server: https://{GATEWAY}:{APISERVER_PORT}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n{auth}contexts:\n- name: weft-e2e\n  context:\n    cluster: weft-e2e\n    user: {user}\ncurrent-context: weft-e2e\n",
        ca.display()
    )
}

fn cert_auth(crt: &Path, key: &Path) -> String {
    format!(
        "    client-certificate: {}\n    client-key: {}\n",
        crt.display(),
        key.display()
    )
}

impl KubeCluster {
    /// Starts a cluster with the default [`Options`] (2 nodes unless
    /// `WEFT_KUBE_NODES` says otherwise) and waits until every node is Ready and
    /// the `default` ServiceAccount exists.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("a Kubernetes cluster needs root (namespaces, mounts, cgroups, iptables)");
        }
        if opts.nodes == 0 || opts.nodes > 9 {
            bail!("nodes must be 1..=9, not {}", opts.nodes);
        }
        let lock = lock(Duration::from_secs(1800))?;
        // What a run that died left behind.
        clean_host(&opts.dir)?;
        let bins = kube_binaries()?;
        let t0 = Instant::now();
        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let baseline = Baseline::capture();
        baseline.save(&dir)?;
        let cg2 = host::cgroup2()?;
        let mut c = Self {
            daemons_cgroup: cg2.join(host::CGROUP).join("daemons"),
            dir,
            bins,
            nodes: Vec::new(),
            etcd: None,
            apiserver: None,
            controller_manager: None,
            scheduler: None,
            baseline,
            startup: Duration::ZERO,
            milestones: Vec::new(),
            weft_images: Vec::new(),
            dns: None,
            t0,
            torn_down: false,
            _lock: lock,
        };
        // On an error, `c` is dropped here and tears everything down.
        c.bring_up(&opts)?;
        c.startup = t0.elapsed();
        Ok(c)
    }

    fn milestone(&mut self, what: &str) {
        self.milestones.push((what.to_string(), self.t0.elapsed()));
    }

    fn bring_up(&mut self, opts: &Options) -> anyhow::Result<()> {
        // Everything the harness starts goes into this group (cgroup2) first.
        std::fs::create_dir_all(&self.daemons_cgroup)
            .with_context(|| format!("creating {}", self.daemons_cgroup.display()))?;
        for i in 1..=opts.nodes {
            let name = format!("node-{i}");
            let n = KubeNode {
                ip: format!("10.201.0.{}", 10 + i),
                pod_cidr: format!("10.245.{i}.0/24"),
                netns: format!("{}{name}", host::NETNS_PREFIX),
                dir: self.dir.join(&name),
                name,
                index: i,
                holder: None,
                containerd: None,
                kubelet: None,
                proxy: None,
            };
            host::create_cgroup_everywhere(&format!("{}/{}", host::CGROUP, n.name))?;
            self.nodes.push(n);
        }
        self.make_private_mount_points()?;
        let pki = self.write_pki()?;
        self.create_network()?;
        self.start_etcd()?;
        self.milestone("host network, cgroups, certificates");
        self.start_apiserver()?;
        self.start_dns()?;
        self.milestone("etcd and kube-apiserver ready");
        self.start_controller_manager()?;
        self.start_scheduler()?;
        self.build_images()?;
        self.milestone("pause and app images built");
        let weft_images = if opts.weft_images {
            weft_image_archives()
        } else {
            Vec::new()
        };
        // The references pods name them by (the chart's default repositories).
        self.weft_images = weft_images
            .iter()
            .filter_map(|(archive, repo)| {
                let file = archive.file_name()?.to_str()?;
                let image = repo.rsplit('/').next()?;
                let tag = file
                    .strip_prefix(&format!("{image}-"))?
                    .strip_suffix(".oci.tar")?;
                Some(format!("{repo}:{tag}"))
            })
            .collect();
        for i in 0..self.nodes.len() {
            self.start_node_runtime(i, &weft_images)?;
        }
        self.milestone("containerd ready, images imported (every node)");
        for i in 0..self.nodes.len() {
            self.start_kubelet(i, &pki)?;
        }
        self.wait_nodes_ready(Duration::from_secs(120))?;
        self.milestone("nodes Ready");
        for i in 0..self.nodes.len() {
            let (name, cidr) = (self.nodes[i].name.clone(), self.nodes[i].pod_cidr.clone());
            // Recorded like the node IPAM controller would (weft reads it).
            self.kubectl(&[
                "patch",
                "node",
                &name,
                "-p",
                &format!("{{\"spec\":{{\"podCIDR\":\"{cidr}\",\"podCIDRs\":[\"{cidr}\"]}}}}"),
            ])?;
            self.start_kube_proxy(i)?;
        }
        // Pods are refused by the ServiceAccount admission plugin until the
        // controller-manager has made the namespace's `default` account.
        let ok = poll(Duration::from_secs(60), || {
            self.kubectl(&["-n", "default", "get", "serviceaccount", "default"])
                .ok()
                .map(|_| ())
        });
        if ok.is_none() {
            bail!(
                "the controller-manager made no default ServiceAccount within 60 s\n{}",
                proc_tail(&self.controller_manager, 40)
            );
        }
        self.milestone("default ServiceAccount");
        for i in 0..self.nodes.len() {
            self.wait_proxy_synced(i, Duration::from_secs(60))?;
        }
        self.milestone("kube-proxy rules written");
        Ok(())
    }

    // ---------------------------------------------------------------- processes

    /// A command that joins the daemons' cgroup, then (optionally) the node's
    /// network and mount namespaces, clears the environment and runs `program`.
    fn daemon(&self, program: &Path, node: Option<usize>, env: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.daemons_cgroup.display()
            ))
            .arg("weft-kube-spawn");
        if let Some(i) = node {
            let n = &self.nodes[i];
            cmd.arg("nsenter")
                .arg(format!("--net=/run/netns/{}", n.netns));
            if let Some(m) = n.mount_ns() {
                cmd.arg(format!("--mount={}", m.display()));
            }
            cmd.arg("--");
        }
        cmd.args(["env", "-i", CLEAN_PATH, "HOME=/root"])
            .args(env)
            .arg(program);
        cmd
    }

    fn spawn(&self, name: &str, cmd: &mut Command, log: &str) -> anyhow::Result<Proc> {
        let p = Proc::spawn(name, cmd, &self.dir.join("logs").join(log))?;
        // For the record (teardown finds processes through their cgroups).
        let line = format!("{} {name}\n", p.pid());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pids"))?;
        f.write_all(line.as_bytes())?;
        Ok(p)
    }

    // ---------------------------------------------------------------- host setup

    /// Creates the host mount points the nodes bind their private directories on
    /// (recorded, so teardown removes the ones it created).
    fn make_private_mount_points(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.dir.join("logs"))?;
        for p in host::PRIVATE_PATHS {
            let mut missing = Vec::new();
            let mut cur = Some(Path::new(p));
            while let Some(d) = cur {
                if d.exists() {
                    break;
                }
                missing.push(d.to_path_buf());
                cur = d.parent();
            }
            for d in missing.iter().rev() {
                std::fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
                self.baseline
                    .created_dirs
                    .push(d.to_string_lossy().into_owned());
            }
        }
        self.baseline.save(&self.dir)
    }

    fn write_pki(&self) -> anyhow::Result<pki::Pki> {
        let d = self.dir.join("pki");
        let pki = pki::Pki::new(&d)?;
        let gw: IpAddr = GATEWAY.parse()?;
        let svc: IpAddr = KUBERNETES_SERVICE_IP.parse()?;
        let lo: IpAddr = "127.0.0.1".parse()?;
        pki.issue(
            "apiserver",
            "kube-apiserver",
            &[],
            &[
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "localhost",
            ],
            &[gw, svc, lo],
            pki::Usage::Server,
        )?;
        pki.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            &["system:masters"],
            &[],
            &[],
            pki::Usage::Client,
        )?;
        pki.service_account_key()?;
        let ca = pki.ca_cert();
        for (file, user) in [
            ("controller-manager", "system:kube-controller-manager"),
            ("scheduler", "system:kube-scheduler"),
            ("kube-proxy", "system:kube-proxy"),
        ] {
            let (crt, key) = pki.issue(file, user, &[], &[], &[], pki::Usage::Client)?;
            write(
                &self.dir.join(format!("{file}.kubeconfig")),
                &kubeconfig(&ca, user, &cert_auth(&crt, &key)),
            )?;
        }
        write(
            &d.join("tokens.csv"),
            &format!("{ADMIN_TOKEN},weft-e2e-admin,weft-e2e-admin,system:masters\n"),
        )?;
        write(
            &self.kubeconfig(),
            &kubeconfig(&ca, "admin", &format!("    token: {ADMIN_TOKEN}\n")),
        )?;
        Ok(pki)
    }

    /// The fabric bridge on the host, one namespace per node with a veth on it,
    /// and the routes between nodes' pod CIDRs.
    fn create_network(&self) -> anyhow::Result<()> {
        use host::run;
        run("ip", &["link", "add", host::BRIDGE, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{GATEWAY}/24"), "dev", host::BRIDGE],
        )?;
        run("ip", &["link", "set", host::BRIDGE, "up"])?;
        for n in &self.nodes {
            let ns = n.netns.as_str();
            let veth = format!("{}{}", host::VETH_PREFIX, n.name);
            run("ip", &["netns", "add", ns])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            run("ip", &["link", "set", &veth, "master", host::BRIDGE, "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/24", n.ip),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            run(
                "nsenter",
                &[
                    &format!("--net=/run/netns/{ns}"),
                    "--",
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            )?;
            // No default route: nothing from a node or pod can leave the machine.
            run(
                "ip",
                &["-n", ns, "route", "add", SERVICE_CIDR, "via", GATEWAY],
            )?;
            for m in self.nodes.iter().filter(|m| m.index != n.index) {
                run("ip", &["-n", ns, "route", "add", &m.pod_cidr, "via", &m.ip])?;
            }
            // The API server answers pods (and reaches webhooks) through these.
            run("ip", &["route", "add", &n.pod_cidr, "via", &n.ip])?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ control plane

    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let (client, peer) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        let etcd = PathBuf::from("/usr/bin/etcd");
        let mut cmd = self.daemon(&etcd, None, &[]);
        cmd.arg("--name=weft-kube")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=weft-kube={peer}"))
            .arg("--listen-metrics-urls=")
            .arg("--log-level=warn");
        self.etcd = Some(self.spawn("etcd", &mut cmd, "etcd.log")?);
        write(&self.dir.join("etcd-url"), &client)?;
        Ok(())
    }

    fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let etcd = std::fs::read_to_string(self.dir.join("etcd-url"))?;
        let p = self.dir.join("pki");
        let f = |name: &str| p.join(name).display().to_string();
        let mut cmd = self.daemon(&self.bins.join("kube-apiserver"), None, &[]);
        cmd.arg(format!("--etcd-servers={etcd}"))
            .arg(format!("--bind-address={GATEWAY}"))
            .arg(format!("--advertise-address={GATEWAY}"))
            .arg(format!("--secure-port={APISERVER_PORT}"))
            .arg("--insecure-port=0")
            .arg(format!("--tls-cert-file={}", f("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", f("apiserver.key")))
            .arg(format!("--client-ca-file={}", f("ca.crt")))
            .arg(format!("--token-auth-file={}", f("tokens.csv")))
            .arg(format!("--service-account-key-file={}", f("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                f("sa.key")
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--api-audiences=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--allow-privileged=true")
            // Its default is Hostname first: DNS lookups that would leave the machine.
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg(format!(
                "--kubelet-client-certificate={}",
                f("apiserver-kubelet-client.crt")
            ))
            .arg(format!(
                "--kubelet-client-key={}",
                f("apiserver-kubelet-client.key")
            ))
            .arg(format!("--kubelet-certificate-authority={}", f("ca.crt")))
            .arg(format!(
                "--cert-dir={}",
                self.dir.join("apiserver-certs").display()
            ))
            .arg("--profiling=false")
            .arg("--v=1");
        self.apiserver = Some(self.spawn("kube-apiserver", &mut cmd, "kube-apiserver.log")?);
        let ready = poll(Duration::from_secs(90), || {
            if !self.apiserver.as_mut().is_some_and(|p| p.is_running()) {
                return Some(false);
            }
            let out = self.kubectl_output(&["get", "--raw", "/readyz"]).ok()?;
            (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok")
                .then_some(true)
        });
        if ready != Some(true) {
            bail!(
                "kube-apiserver exited or was not ready within 90 s\n{}\n{}",
                proc_tail(&self.apiserver, 40),
                proc_tail(&self.etcd, 20)
            );
        }
        Ok(())
    }

    /// The cluster DNS on the gateway (see [`dns`]), reading Services with kubectl.
    fn start_dns(&mut self) -> anyhow::Result<()> {
        let kubectl = self.bins.join("kubectl");
        let kubeconfig = self.kubeconfig();
        let services: dns::ServiceSource = Box::new(move || {
            let out = Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args([
                    "get",
                    "services",
                    "--all-namespaces",
                    "-o",
                    "json",
                    "--request-timeout=5s",
                ])
                .stdin(Stdio::null())
                .output()
                .context("running kubectl")?;
            if !out.status.success() {
                bail!(
                    "kubectl get services failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let v: Value = serde_json::from_slice(&out.stdout).context("kubectl's JSON")?;
            Ok(dns::services_from_json(&v))
        });
        let addr = format!("{GATEWAY}:53").parse()?;
        self.dns = Some(dns::ClusterDns::start(
            addr,
            services,
            self.dir.join("logs/dns.log"),
        )?);
        Ok(())
    }

    fn start_controller_manager(&mut self) -> anyhow::Result<()> {
        let p = self.dir.join("pki");
        let kc = self.dir.join("controller-manager.kubeconfig");
        let mut cmd = self.daemon(&self.bins.join("kube-controller-manager"), None, &[]);
        cmd.arg(format!("--kubeconfig={}", kc.display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--port=0")
            .arg("--leader-elect=false")
            // Real ServiceAccount tokens (the tokens controller) and per-controller
            // credentials.
            .arg("--use-service-account-credentials=true")
            .arg(format!(
                "--service-account-private-key-file={}",
                p.join("sa.key").display()
            ))
            .arg(format!("--root-ca-file={}", p.join("ca.crt").display()))
            .arg(format!(
                "--cluster-signing-cert-file={}",
                p.join("ca.crt").display()
            ))
            .arg(format!(
                "--cluster-signing-key-file={}",
                p.join("ca.key").display()
            ))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
            .arg("--allocate-node-cidrs=false")
            // Its default is under /usr/libexec/kubernetes, which it would create.
            .arg(format!(
                "--flex-volume-plugin-dir={}",
                self.dir.join("flexvolume").display()
            ))
            .arg("--v=1");
        self.controller_manager = Some(self.spawn(
            "kube-controller-manager",
            &mut cmd,
            "kube-controller-manager.log",
        )?);
        Ok(())
    }

    fn start_scheduler(&mut self) -> anyhow::Result<()> {
        let kc = self.dir.join("scheduler.kubeconfig");
        let mut cmd = self.daemon(&self.bins.join("kube-scheduler"), None, &[]);
        cmd.arg(format!("--kubeconfig={}", kc.display()))
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--port=0")
            .arg("--leader-elect=false")
            .arg("--v=1");
        self.scheduler = Some(self.spawn("kube-scheduler", &mut cmd, "kube-scheduler.log")?);
        Ok(())
    }

    // -------------------------------------------------------------------- images

    fn build_images(&self) -> anyhow::Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/build-images.sh");
        let testapp = crate::process::bin_path("weft-testapp")?;
        let out = Command::new(&script)
            .arg("--out")
            .arg(self.dir.join("images"))
            .arg("--testapp")
            .arg(&testapp)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The image references in a node's containerd (namespace k8s.io), digests
    /// left out.
    pub fn node_images(&self, node: usize) -> anyhow::Result<Vec<String>> {
        let out = host::run(
            "ctr",
            &[
                "--address",
                &self.nodes[node].containerd_socket().display().to_string(),
                "-n",
                "k8s.io",
                "images",
                "ls",
                "-q",
            ],
        )?;
        Ok(out
            .lines()
            .filter(|l| !l.starts_with("sha256:"))
            .map(String::from)
            .collect())
    }

    /// Imports an OCI archive into a node's containerd (namespace k8s.io).
    pub fn import_image(&self, node: usize, archive: &Path, name: &str) -> anyhow::Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.nodes[node].containerd_socket())
            .args(["-n", "k8s.io", "images", "import", "--base-name", name])
            .arg(archive)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr images import {} on {} failed: {}{}",
                archive.display(),
                self.nodes[node].name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    // --------------------------------------------------------------------- nodes

    /// The node's mount namespace (private binds over the fixed host paths and
    /// the kubelet's sysctls), its CNI configuration, containerd, and the images.
    fn start_node_runtime(
        &mut self,
        i: usize,
        weft_images: &[(PathBuf, String)],
    ) -> anyhow::Result<()> {
        let d = self.nodes[i].dir.clone();
        for sub in [
            "containerd",
            "cni/net.d",
            "cni/bin",
            "cni/ipam",
            "kubelet",
            "netns",
            "sysctl",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        // Debian's CNI plugins, where the standard bin_dir is (weft-cni joins them
        // when weft's chart installs it).
        let bin_dir = self.nodes[i].cni_bin_dir();
        for e in std::fs::read_dir("/usr/lib/cni").context("reading /usr/lib/cni")? {
            let e = e?;
            let link = bin_dir.join(e.file_name());
            std::os::unix::fs::symlink(e.path(), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        // The process that holds the mount namespace.
        let mut cmd = self.daemon(Path::new("/usr/bin/unshare"), None, &[]);
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sleep",
            "infinity",
        ]);
        let name = self.nodes[i].name.clone();
        let holder = self.spawn(
            &format!("{name} mount namespace"),
            &mut cmd,
            &format!("{name}-holder.log"),
        )?;
        let mine = std::fs::read_link("/proc/self/ns/mnt")?;
        let pid = holder.pid();
        let ok = poll(Duration::from_secs(5), || {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
            // Past `exec sleep`: the namespace is made and nothing else will change.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (theirs != mine && comm.trim() == "sleep").then_some(())
        });
        self.nodes[i].holder = Some(holder);
        if ok.is_none() {
            bail!("{name}: unshare did not make a mount namespace");
        }
        let mut script = String::from("set -e\n");
        for p in host::PRIVATE_PATHS
            .iter()
            .filter(|p| **p != "/var/lib/kubelet")
        {
            let own = self.nodes[i].private_dir(p);
            std::fs::create_dir_all(&own)?;
            script += &format!("mount --bind {} {p}\n", own.display());
        }
        // /var/lib/kubelet (the device plugins' fixed path) is the kubelet's root
        // dir; pods' network namespaces are mounted inside the node.
        script += &format!(
            "mount --bind {} /var/lib/kubelet\n",
            d.join("kubelet").display()
        );
        script += &format!("mount --bind {} /run/netns\n", d.join("netns").display());
        // A bpffs of the node's own: two node agents on one kernel must not see
        // each other's pins. It goes with the namespace.
        script += &format!("mount -t bpf bpf {}\n", host::BPFFS);
        for s in host::KUBELET_SYSCTLS {
            let own = d.join("sysctl").join(s.replace('/', "."));
            let value = std::fs::read_to_string(Path::new("/proc/sys").join(s))?;
            std::fs::write(&own, value)?;
            script += &format!("mount --bind {} /proc/sys/{s}\n", own.display());
        }
        // Every mount shared, as systemd leaves a real host (within the node only:
        // the namespace was made private, so nothing propagates to or from the
        // host). containerd refuses a HostToContainer volume on a mount that is
        // neither shared nor a slave, and looks /var/run/netns up without
        // following the /var/run symlink, i.e. checks "/" (weft's DaemonSet mounts
        // /var/run/netns and the bpffs so).
        script += "mount --make-rshared /\n";
        let m = self.nodes[i].mount_ns().context("mount namespace")?;
        host::run(
            "nsenter",
            &[
                &format!("--mount={}", m.display()),
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .with_context(|| format!("{name}: setting up its mount namespace"))?;

        let n = &self.nodes[i];
        write(
            &n.cni_conf_dir().join("10-weft-kube.conflist"),
            &serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "weft-kube",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": n.pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": d.join("cni/ipam").display().to_string(),
                    },
                }],
            }))?,
        )?;
        let config = d.join("containerd/config.toml");
        write(&config, &containerd_config(n))?;
        let mut cmd = self.daemon(Path::new("/usr/bin/containerd"), Some(i), &[]);
        cmd.arg("--config").arg(&config);
        let p = self.spawn(
            &format!("{name} containerd"),
            &mut cmd,
            &format!("{name}-containerd.log"),
        )?;
        self.nodes[i].containerd = Some(p);
        let sock = self.nodes[i].containerd_socket();
        let ready = poll(Duration::from_secs(30), || {
            if !self.nodes[i].containerd.as_mut()?.is_running() {
                return Some(false);
            }
            let out = Command::new("ctr")
                .arg("--address")
                .arg(&sock)
                .args(["plugins", "ls"])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let cri_ok = text.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.first() == Some(&"io.containerd.grpc.v1")
                    && w.get(1) == Some(&"cri")
                    && w.last() == Some(&"ok")
            });
            let overlay_ok = text.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.get(1) == Some(&"overlayfs") && w.last() == Some(&"ok")
            });
            (out.status.success() && cri_ok && overlay_ok).then_some(true)
        });
        if ready != Some(true) {
            bail!(
                "{name}: containerd exited or its CRI plugin or overlayfs snapshotter was not ok within 30 s\n{}",
                proc_tail(&self.nodes[i].containerd, 40)
            );
        }
        let images = self.dir.join("images");
        self.import_image(i, &images.join("pause.oci.tar"), "docker.io/weft-e2e/pause")?;
        self.import_image(i, &images.join("app.oci.tar"), "docker.io/weft-e2e/app")?;
        for (archive, name) in weft_images {
            self.import_image(i, archive, name)?;
        }
        Ok(())
    }

    fn start_kubelet(&mut self, i: usize, pki: &pki::Pki) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let d = n.dir.clone();
        let (name, ip) = (n.name.clone(), n.ip.clone());
        let node_ip: IpAddr = ip.parse()?;
        let (crt, key) = pki.issue(
            &format!("{name}-kubelet-client"),
            &format!("system:node:{name}"),
            &["system:nodes"],
            &[],
            &[],
            pki::Usage::Client,
        )?;
        let (serving_crt, serving_key) = pki.issue(
            &format!("{name}-kubelet"),
            &name,
            &[],
            &[&name],
            &[node_ip],
            pki::Usage::Server,
        )?;
        let kc = d.join("kubelet.kubeconfig");
        write(
            &kc,
            &kubeconfig(
                &pki.ca_cert(),
                &format!("system:node:{name}"),
                &cert_auth(&crt, &key),
            ),
        )?;
        // The node's own resolver (pods with dnsPolicy Default; the cluster DNS
        // answers the others): their own loopback, so no DNS leaves the machine.
        write(&d.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let config = d.join("kubelet.yaml");
        write(
            &config,
            &format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: {serving_crt}
tlsPrivateKeyFile: {serving_key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
cgroupRoot: /{cg}/{name}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
clusterDomain: {domain}
clusterDNS: [{dns}]
resolvConf: {resolv}
failSwapOn: false
protectKernelDefaults: false
oomScoreAdj: 0
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
volumePluginDir: {plugins}
serializeImagePulls: false
# Ready within seconds of registering, not at the next 10 s update (with node
# leases it only posts a status that changed).
nodeStatusUpdateFrequency: 2s
",
                serving_crt = serving_crt.display(),
                serving_key = serving_key.display(),
                ca = pki.ca_cert().display(),
                cg = host::CGROUP,
                domain = dns::CLUSTER_DOMAIN,
                dns = GATEWAY,
                resolv = d.join("resolv.conf").display(),
                plugins = d.join("volume-plugins").display(),
            ),
        )?;
        let sock = n.containerd_socket();
        let mut cmd = self.daemon(
            &self.bins.join("kubelet"),
            Some(i),
            &["AWS_EC2_METADATA_DISABLED=true"],
        );
        cmd.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kc.display()))
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                sock.display()
            ))
            .arg(format!("--pod-infra-container-image={PAUSE_IMAGE}"))
            .arg(format!("--hostname-override={name}"))
            .arg(format!("--node-ip={ip}"))
            .arg(format!("--root-dir={}", d.join("kubelet").display()))
            .arg(format!("--cert-dir={}", d.join("kubelet/pki").display()))
            .arg("--node-labels=weft.dev/e2e-node=true")
            .arg("--v=2");
        let p = self.spawn(
            &format!("{name} kubelet"),
            &mut cmd,
            &format!("{name}-kubelet.log"),
        )?;
        self.nodes[i].kubelet = Some(p);
        Ok(())
    }

    fn start_kube_proxy(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let kc = self.dir.join("kube-proxy.kubeconfig");
        let mut cmd = self.daemon(&self.bins.join("kube-proxy"), Some(i), &[]);
        cmd.arg(format!("--kubeconfig={}", kc.display()))
            .arg("--proxy-mode=iptables")
            .arg(format!("--hostname-override={}", n.name))
            .arg(format!("--bind-address={}", n.ip))
            .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
            .arg("--healthz-bind-address=127.0.0.1:10256")
            .arg("--metrics-bind-address=127.0.0.1:10249")
            // Leave the host's (global) conntrack settings alone.
            .arg("--conntrack-max-per-core=0")
            .arg("--conntrack-tcp-timeout-established=0")
            .arg("--conntrack-tcp-timeout-close-wait=0")
            .arg("--oom-score-adj=0")
            .arg("--v=2");
        let name = n.name.clone();
        let p = self.spawn(
            &format!("{name} kube-proxy"),
            &mut cmd,
            &format!("{name}-kube-proxy.log"),
        )?;
        self.nodes[i].proxy = Some(p);
        Ok(())
    }

    /// Waits until kube-proxy has written the `default/kubernetes` Service's rules
    /// in the node's namespace.
    fn wait_proxy_synced(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let ns = self.nodes[i].netns.clone();
        let ok = poll(timeout, || {
            if !self.nodes[i].proxy.as_mut()?.is_running() {
                return Some(false);
            }
            let out = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["--", "iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains(KUBERNETES_SERVICE_IP)
                .then_some(true)
        });
        if ok != Some(true) {
            bail!(
                "{}: kube-proxy exited or wrote no rules for {KUBERNETES_SERVICE_IP} within {timeout:?}\n{}",
                self.nodes[i].name,
                proc_tail(&self.nodes[i].proxy, 40)
            );
        }
        Ok(())
    }

    fn wait_nodes_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let want: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let mut last = String::new();
        let ok = poll(timeout, || {
            for n in &mut self.nodes {
                if !n.kubelet.as_mut()?.is_running() || !n.containerd.as_mut()?.is_running() {
                    return Some(false);
                }
            }
            let out = self.kubectl(&["get", "nodes", "-o", "json"]).ok()?;
            let v: Value = serde_json::from_str(&out).ok()?;
            let ready: Vec<String> = v["items"]
                .as_array()?
                .iter()
                .filter(|n| {
                    n["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                })
                .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
                .collect();
            last = format!("ready: {ready:?}");
            want.iter().all(|w| ready.contains(w)).then_some(true)
        });
        if ok != Some(true) {
            let mut msg = format!(
                "nodes {want:?} not Ready within {timeout:?} (a kubelet or containerd exited, or {last})\n"
            );
            for n in &self.nodes {
                msg += &proc_tail(&n.kubelet, 30);
                msg += "\n";
                msg += &proc_tail(&n.containerd, 15);
                msg += "\n";
            }
            bail!(msg);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ kubectl

    /// The admin's kubeconfig (user in `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// kubectl v1.20 with the admin's kubeconfig.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.bins.join("kubectl"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        cmd
    }

    pub fn kubectl_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.kubectl_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    /// Runs kubectl; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl_output(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` with `manifest`.
    pub fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        let mut child = self
            .kubectl_command()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl apply")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(manifest.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `count` pods matching `selector` in `namespace` are Running and
    /// Ready; returns them (`kubectl get pods -o json` items). The error shows the
    /// pods, the namespace's events and the kubelets' log tails.
    pub fn wait_pods_ready(
        &self,
        namespace: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let found = poll(timeout, || {
            let out = self
                .kubectl(&["-n", namespace, "get", "pods", "-l", selector, "-o", "json"])
                .ok()?;
            let v: Value = serde_json::from_str(&out).ok()?;
            let ready: Vec<Value> = v["items"]
                .as_array()?
                .iter()
                .filter(|p| {
                    p["metadata"]["deletionTimestamp"].is_null()
                        && p["status"]["phase"] == "Running"
                        && p["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
                .cloned()
                .collect();
            (ready.len() >= count).then_some(ready)
        });
        found.with_context(|| {
            format!(
                "{count} pods {selector} in {namespace} not Ready within {timeout:?}\n{}\n{}\n{}\n{}",
                self.kubectl(&["-n", namespace, "get", "pods", "-o", "wide"])
                    .unwrap_or_else(|e| e.to_string()),
                self.kubectl(&["-n", namespace, "get", "events", "--sort-by=.lastTimestamp"])
                    .unwrap_or_else(|e| e.to_string()),
                proc_tail(&self.scheduler, 15),
                self.node_logs(30)
            )
        })
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&KubeNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Runs `program args` in a node's network namespace (e.g. iptables, ip).
    pub fn in_node(&self, node: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        let mut all = vec![format!("--net=/run/netns/{}", n.netns)];
        if let Some(m) = n.mount_ns() {
            all.push(format!("--mount={}", m.display()));
        }
        all.push("--".into());
        all.push(program.into());
        all.extend(args.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        host::run("nsenter", &all)
    }

    /// GET `url` from inside a node's network namespace (e.g. a hostNetwork
    /// agent's admin endpoint on 127.0.0.1); the body, or an error with curl's.
    pub fn node_http_get(&self, node: &str, url: &str) -> anyhow::Result<String> {
        self.in_node(
            node,
            "curl",
            &["-sS", "--fail-with-body", "--max-time", "5", url],
        )
    }

    /// What weft left on a node, one line each (empty: nothing): weft-cni in the
    /// node's CNI chain or plugin directory, files in its `/var/run/weft`, pins in
    /// its bpffs under `/sys/fs/bpf/weft`, eBPF programs attached to its cgroup
    /// (when bpftool is installed). After `helm uninstall` this is what the chart
    /// does not clean; teardown removes it all anyway (every one of these is the
    /// node's own: directories, bpffs and cgroup go with the node).
    pub fn weft_node_state(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(n.cni_conf_dir()) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                if text.contains("weft-cni") {
                    out.push(format!(
                        "/etc/cni/net.d/{} still chains weft-cni",
                        e.file_name().to_string_lossy()
                    ));
                }
            }
        }
        if n.cni_bin_dir().join("weft-cni").exists() {
            out.push("/opt/cni/bin/weft-cni".into());
        }
        let mut files = Vec::new();
        list_tree(
            &n.private_dir("/run/weft"),
            Path::new("/var/run/weft"),
            &mut files,
        );
        if let Some(bpf) = n.path_inside(&format!("{}/weft", host::BPFFS)) {
            list_tree(&bpf, &Path::new(host::BPFFS).join("weft"), &mut files);
        }
        out.extend(files);
        if let Ok(cg) = self.node_cgroup(i) {
            for p in cgroup_programs(&cg).unwrap_or_default() {
                out.push(format!("eBPF program attached to {}: {p}", cg.display()));
            }
        }
        out
    }

    /// The node's cgroup (v2): the kubelet's cgroup root, where its pods are.
    pub fn node_cgroup(&self, i: usize) -> anyhow::Result<PathBuf> {
        Ok(host::cgroup2()?
            .join(host::CGROUP)
            .join(&self.nodes[i].name))
    }

    /// Tails of every daemon's log, for error messages.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in [
            &self.etcd,
            &self.apiserver,
            &self.controller_manager,
            &self.scheduler,
        ] {
            out += &proc_tail(p, lines);
            out += "\n";
        }
        out + &self.node_logs(lines)
    }

    fn node_logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            for p in [&n.containerd, &n.kubelet, &n.proxy] {
                out += &proc_tail(p, lines);
                out += "\n";
            }
        }
        out
    }

    /// PIDs of the daemons (not of pods), to measure memory.
    pub fn daemon_pids(&self) -> Vec<u32> {
        [
            &self.etcd,
            &self.apiserver,
            &self.controller_manager,
            &self.scheduler,
        ]
        .into_iter()
        .flatten()
        .chain(self.nodes.iter().flat_map(|n| n.procs()))
        .map(|p| p.pid())
        .collect()
    }

    // ----------------------------------------------------------------- teardown

    /// Stops everything and restores the host; returns an error listing what is
    /// left (see [`host::leftovers`]). Idempotent; also runs on drop.
    pub fn teardown(&mut self) -> anyhow::Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(to) = std::env::var_os("WEFT_KUBE_LOGS") {
            let _ = copy_logs(&self.dir.join("logs"), Path::new(&to));
        }
        if let Some(mut d) = self.dns.take() {
            d.stop();
        }
        // Node agents first, so none restarts a pod while the runtime goes.
        for n in &mut self.nodes {
            for p in [&mut n.proxy, &mut n.kubelet] {
                if let Some(mut p) = p.take() {
                    p.terminate();
                }
            }
        }
        // Containers (in the kubelets' cgroup roots), then the runtimes.
        for n in &self.nodes {
            let alive = host::kill_cgroup(
                &format!("{}/{}", host::CGROUP, n.name),
                Duration::from_secs(10),
            );
            if !alive.is_empty() {
                eprintln!(
                    "teardown: {} containers' processes survive: {alive:?}",
                    n.name
                );
            }
        }
        for n in &mut self.nodes {
            if let Some(mut p) = n.containerd.take() {
                p.terminate();
            }
        }
        // Everything mounted inside the nodes (pods' volumes, shm, overlays, netns).
        let mut errors = Vec::new();
        for n in &self.nodes {
            if let Some(h) = &n.holder {
                errors.extend(host::unmount_in(h.pid(), &self.dir));
            }
        }
        for p in [
            &mut self.scheduler,
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ] {
            if let Some(mut p) = p.take() {
                p.terminate();
            }
        }
        // Shims, mount namespace holders and anything else: killed by PID from the
        // cgroups; then the host objects.
        errors.extend(host::clean(&self.dir, Some(&self.baseline)));
        for n in &mut self.nodes {
            n.holder.take(); // already dead; reaps it
        }
        let left = host::leftovers(&self.dir, Some(&self.baseline));
        errors.extend(left.iter().map(|l| format!("left on the host: {l}")));
        if !errors.is_empty() {
            bail!("teardown incomplete:\n{}", errors.join("\n"));
        }
        Ok(())
    }

    /// What [`teardown`](Self::teardown) would have to undo now (for tests).
    pub fn leftovers(&self) -> Vec<String> {
        host::leftovers(&self.dir, Some(&self.baseline))
    }

    /// The host as it was before the start.
    pub fn baseline(&self) -> &Baseline {
        &self.baseline
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("weft-kube teardown: {e:#}");
        }
    }
}

/// Cleans what a cluster that died (or one still running in another process that
/// does not hold the lock) left in `dir` and on the host; fails if something is
/// still there afterwards.
pub fn clean_host(dir: &Path) -> anyhow::Result<()> {
    let baseline = Baseline::load(dir);
    let stale = !host::leftovers(dir, None).is_empty();
    if stale {
        eprintln!(
            "weft-kube: cleaning what an earlier cluster left:\n  {}",
            host::leftovers(dir, None).join("\n  ")
        );
    }
    let errors = host::clean(dir, baseline.as_ref());
    let left = host::leftovers(dir, None);
    if !errors.is_empty() || !left.is_empty() {
        bail!(
            "cannot clean the host of an earlier Kubernetes cluster:\n{}\nstill there:\n{}",
            errors.join("\n"),
            left.join("\n")
        );
    }
    Ok(())
}

/// Same as [`clean_host`] but takes the cluster lock first (for a `down` command).
pub fn clean_host_locked(dir: &Path) -> anyhow::Result<()> {
    let _lock = lock(Duration::from_secs(5))
        .context("a cluster is running in another process (its own teardown will clean up)")?;
    clean_host(dir)
}

fn copy_logs(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)?.flatten() {
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// The eBPF programs attached to a cgroup (v2) itself, not those it inherits,
/// as bpftool shows them: "<attach type> <name>" (e.g. "cgroup_inet4_connect
/// weft_connect4").
pub fn cgroup_programs(cgroup: &Path) -> anyhow::Result<Vec<String>> {
    let text = host::run(
        "bpftool",
        &["-j", "cgroup", "show", &cgroup.display().to_string()],
    )
    .context("bpftool (Debian package bpftool; build-kube.sh installs it)")?;
    let v: Value = if text.trim().is_empty() {
        Value::Array(Vec::new())
    } else {
        serde_json::from_str(&text).context("bpftool's JSON")?
    };
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {}",
                p["attach_type"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

/// Every file and directory under `dir` (recursively), named as `shown` + the
/// relative path.
fn list_tree(dir: &Path, shown: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = shown.join(e.file_name());
        out.push(name.display().to_string());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            list_tree(&e.path(), &name, out);
        }
    }
}

/// Where `images/build`'s archives are looked for: WEFT_IMAGES_DIR, else
/// target/images.
pub fn weft_images_dir() -> PathBuf {
    std::env::var_os("WEFT_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images"))
}

/// The chart's appVersion, the tag `images/build` gives weft's images.
pub fn chart_app_version() -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/Chart.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{} has no appVersion", path.display()))
}

/// Makes sure [`weft_images_dir`] holds weft's two images built from the binaries
/// in `bin_dir` (e.g. target/debug): runs `images/build --profile <profile>` when
/// an archive is missing or older than a binary it packages. Returns the archives.
/// (Needs umoci, which [`kube_binaries`] installs.)
pub fn ensure_weft_images(bin_dir: &Path, profile: &str) -> anyhow::Result<Vec<PathBuf>> {
    let tag = chart_app_version()?;
    let out = weft_images_dir();
    let archives: Vec<PathBuf> = ["weft-node", "weft-control-plane"]
        .iter()
        .map(|i| out.join(format!("{i}-{tag}.oci.tar")))
        .collect();
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // Not weft-cni: images/build relinks it statically (then the next cargo build
    // relinks it again); its code is weft-node's library, so weft-node tells.
    let newest_bin = ["weft-node", "weft-control-plane", "weftctl"]
        .iter()
        .filter_map(|b| mtime(&bin_dir.join(b)))
        .max()
        .with_context(|| {
            format!(
                "no weft binaries in {}; build them first: cargo build --workspace --bins",
                bin_dir.display()
            )
        })?;
    let stale = archives
        .iter()
        .any(|a| mtime(a).is_none_or(|t| t < newest_bin));
    if !stale {
        return Ok(archives);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build");
    // bin_dir is <target>/<profile>; images/build finds the binaries there.
    let target = bin_dir
        .parent()
        .with_context(|| format!("{} has no parent", bin_dir.display()))?;
    eprintln!(
        "weft-kube: building weft's images ({profile}) into {}",
        out.display()
    );
    let status = Command::new("nice")
        .args(["-n", "10"])
        .arg(&script)
        .args(["--profile", profile, "--out"])
        .arg(&out)
        .env("CARGO_TARGET_DIR", target)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); see its output above",
            script.display()
        );
    }
    for a in &archives {
        if !a.is_file() {
            bail!("{} made no {}", script.display(), a.display());
        }
    }
    Ok(archives)
}

/// `images/build`'s archives in [`weft_images_dir`]: (path, repository to import as).
fn weft_image_archives() -> Vec<(PathBuf, String)> {
    let dir = weft_images_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        for image in ["weft-node", "weft-control-plane"] {
            let prefix = format!("{image}-");
            if file.starts_with(&prefix) && file.ends_with(".oci.tar") {
                out.push((e.path(), format!("{WEFT_IMAGE_REPOSITORY}/{image}")));
            }
        }
    }
    out
}

/// containerd's configuration for one node: its own socket, root, state and runc
/// root; the CRI plugin with the local sandbox image and the CNI directories at
/// their standard paths (private to the node).
fn containerd_config(n: &KubeNode) -> String {
    let d = n.dir.join("containerd");
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
oom_score = 0
# Snapshotters that cannot work here (and would try to load kernel modules).
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{sock}"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj is refused and runc
  # fails every sandbox ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  # The standard paths, which are the node's own (bind mounts in its mount namespace).
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#,
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = n.containerd_socket().display(),
        opt = d.join("opt").display(),
        pause = PAUSE_IMAGE,
        runc = d.join("runc").display(),
    )
}
