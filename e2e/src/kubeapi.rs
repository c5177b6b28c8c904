//! A real Kubernetes API server on loopback: Debian's etcd plus kube-apiserver
//! v1.20.2 built from Debian's source package (`e2e/kube/build-kube.sh`,
//! cached under ~/.cache/weft/kube). No controller-manager, scheduler or kubelet:
//! tests create Pods with `spec.nodeName` and patch `status.podIP` themselves, and
//! mint ServiceAccount tokens with TokenRequest.
//!
//! Authentication: an admin bearer token (`system:masters`) in a kubeconfig file.
//! Everything (etcd data, certificates, logs) lives in one temporary directory;
//! both processes are killed by PID and the directory removed on drop.

use crate::process::{free_port, wait_until, Proc};
use anyhow::bail;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub const ADMIN_TOKEN: &str = "weft-e2e-admin-token";

pub struct KubeApi {
    pub dir: tempfile::TempDir,
    pub port: u16,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    binary: PathBuf,
    etcd_port: u16,
    starts: u32,
}

/// Builds (once, cached) the Kubernetes binaries and returns kube-apiserver's path.
pub fn apiserver_binary() -> anyhow::Result<PathBuf> {
    Ok(crate::kubecluster::kube_binaries()?.join("kube-apiserver"))
}

impl KubeApi {
    pub fn start() -> anyhow::Result<Self> {
        let binary = apiserver_binary()?;
        let dir = tempfile::Builder::new().prefix("weft-kube-").tempdir()?;
        let d = dir.path();
        // Serving certificate for 127.0.0.1 from a throwaway CA; the SA signing key.
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "weft-e2e kube CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let srv_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut srv_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "kubernetes".to_string()])?;
        srv_params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
        let srv = srv_params.signed_by(&srv_key, &issuer)?;
        let sa_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        std::fs::write(d.join("ca.crt"), ca.pem())?;
        std::fs::write(d.join("apiserver.crt"), srv.pem())?;
        std::fs::write(d.join("apiserver.key"), srv_key.serialize_pem())?;
        std::fs::write(d.join("sa.key"), sa_key.serialize_pem())?;
        std::fs::write(d.join("sa.pub"), sa_key.public_key_pem())?;
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},weft-e2e-admin,weft-e2e-admin,system:masters\n"),
        )?;
        let mut k = Self {
            port: free_port(),
            etcd_port: free_port(),
            dir,
            etcd: None,
            apiserver: None,
            binary,
            starts: 0,
        };
        k.write_kubeconfig()?;
        k.start_etcd()?;
        k.start_apiserver()?;
        Ok(k)
    }

    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let peer = free_port();
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer_url = format!("http://127.0.0.1:{peer}");
        let p = Proc::spawn(
            "etcd",
            Command::new("etcd")
                .arg("--name=weft-e2e")
                .arg(format!("--data-dir={}", d.join("etcd").display()))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=weft-e2e={peer_url}"))
                .arg("--listen-metrics-urls=")
                .arg("--log-level=warn"),
            &d.join("etcd.log"),
        )?;
        self.etcd = Some(p);
        Ok(())
    }

    /// Starts (or restarts) kube-apiserver and waits until it is ready.
    pub fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        self.starts += 1;
        let log = d.join(format!("kube-apiserver.{}.log", self.starts));
        let p = Proc::spawn(
            "kube-apiserver",
            Command::new(&self.binary)
                .arg(format!(
                    "--etcd-servers=http://127.0.0.1:{}",
                    self.etcd_port
                ))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--secure-port={}", self.port))
                .arg("--insecure-port=0")
                .arg(format!(
                    "--tls-cert-file={}",
                    d.join("apiserver.crt").display()
                ))
                .arg(format!(
                    "--tls-private-key-file={}",
                    d.join("apiserver.key").display()
                ))
                .arg(format!(
                    "--token-auth-file={}",
                    d.join("tokens.csv").display()
                ))
                .arg(format!(
                    "--service-account-key-file={}",
                    d.join("sa.pub").display()
                ))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    d.join("sa.key").display()
                ))
                .arg("--service-account-issuer=https://kubernetes.default.svc")
                .arg("--api-audiences=https://kubernetes.default.svc")
                .arg("--service-cluster-ip-range=10.96.0.0/16")
                .arg("--endpoint-reconciler-type=none")
                .arg("--authorization-mode=RBAC")
                .arg("--allow-privileged=true")
                .arg("--disable-admission-plugins=ServiceAccount")
                .arg(format!("--cert-dir={}", d.join("certs").display()))
                .arg("--v=1"),
            &log,
        )?;
        self.apiserver = Some(p);
        let url = format!("https://127.0.0.1:{}/readyz", self.port);
        let ready = wait_until(Duration::from_secs(60), || {
            if !self.apiserver.as_mut().is_some_and(|p| p.is_running()) {
                return Some(false);
            }
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(d.join("ca.crt"))
                .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
                .arg(&url)
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout) == "200").then_some(true)
        });
        if ready != Some(true) {
            bail!(
                "kube-apiserver exited or was not ready within 60 s; log tail:\n{}",
                tail(&self.apiserver_log(), 30)
            );
        }
        Ok(())
    }

    /// Kills kube-apiserver (SIGKILL, like a crash); etcd keeps the data.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.kill();
        }
    }

    pub fn apiserver_log(&self) -> String {
        self.apiserver
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn write_kubeconfig(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: admin\ncurrent-context: e2e\n",
            self.port,
            self.dir.path().join("ca.crt").display()
        );
        let mut f = std::fs::File::create(self.kubeconfig())?;
        f.write_all(text.as_bytes())?;
        Ok(())
    }

    /// A kube client with admin rights.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(cfg)?)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // Children first (by PID, ours only), then the directory with the tempdir.
        self.apiserver.take();
        self.etcd.take();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
