use super::*;
use std::sync::Mutex;

/// Enrollment as a test scripts it: a state per pod name and namespace knowledge.
struct Fake {
    state: Mutex<PodState>,
    namespaces: Mutex<Option<bool>>,
    changed: watch::Sender<u64>,
}

impl Fake {
    fn new(state: PodState, ns: Option<bool>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state),
            namespaces: Mutex::new(ns),
            changed: watch::channel(0).0,
        })
    }
    fn set(&self, s: PodState) {
        *self.state.lock().unwrap() = s;
        self.changed.send_modify(|v| *v += 1);
    }
}

impl Enrollment for Fake {
    fn state(&self, _: &Sandbox) -> PodState {
        *self.state.lock().unwrap()
    }
    fn namespace_enrolled(&self, _: &str) -> Option<bool> {
        *self.namespaces.lock().unwrap()
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

fn add(netns: &str) -> Request {
    Request {
        command: Command::Add,
        sandbox: Sandbox {
            container_id: "c1".into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: "web-1".into(),
            pod_uid: "u1".into(),
            ips: vec!["10.244.1.5".into()],
        },
    }
}

const NETNS: &str = "/proc/self/ns/net";
const WAIT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn add_of_an_enrolled_pod_answers_only_once_its_capture_is_in_place() {
    let reg = PodRegistry::load(None);
    let fake = Fake::new(PodState::Pending, Some(true));
    let f = fake.clone();
    let captured_at = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let at = tokio::time::Instant::now();
        f.set(PodState::Captured);
        at
    });
    let r = handle(&reg, fake.as_ref(), add(NETNS), Duration::from_secs(5)).await;
    let answered = tokio::time::Instant::now();
    assert!(r.ok && r.enrolled, "{r:?}");
    assert!(
        answered >= captured_at.await.unwrap(),
        "answered before the capture was in place"
    );
    assert!(reg.get("c1").is_some(), "the sandbox is recorded");
}

#[tokio::test]
async fn add_is_refused_when_the_capture_is_not_in_place_in_time() {
    let reg = PodRegistry::load(None);
    let fake = Fake::new(PodState::Pending, Some(true));
    let r = handle(&reg, fake.as_ref(), add(NETNS), WAIT).await;
    assert!(!r.ok && r.enrolled, "{r:?}");
    assert!(
        r.error.contains("shop/web-1") && r.error.contains("capture"),
        "{}",
        r.error
    );
}

#[tokio::test]
async fn add_of_a_pod_outside_the_mesh_is_answered_at_once() {
    let reg = PodRegistry::load(None);
    let fake = Fake::new(PodState::Outside, None);
    let t = tokio::time::Instant::now();
    let r = handle(&reg, fake.as_ref(), add(NETNS), Duration::from_secs(5)).await;
    assert!(r.ok && !r.enrolled, "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        reg.get("c1").is_some(),
        "recorded: it may be enrolled later"
    );
}

#[tokio::test]
async fn add_of_a_pod_the_control_plane_never_described_fails_unless_its_namespace_is_outside() {
    for (ns, ok) in [(Some(false), true), (Some(true), false), (None, false)] {
        let reg = PodRegistry::load(None);
        let fake = Fake::new(PodState::Unknown, ns);
        let r = handle(&reg, fake.as_ref(), add(NETNS), WAIT).await;
        assert_eq!(r.ok, ok, "namespace {ns:?}: {r:?}");
        assert!(!r.enrolled || ns == Some(true));
        if !ok {
            assert!(
                r.error.contains("does not know pod shop/web-1"),
                "{}",
                r.error
            );
        }
    }
}

#[tokio::test]
async fn add_waits_for_the_workload_to_arrive() {
    let reg = PodRegistry::load(None);
    let fake = Fake::new(PodState::Unknown, None);
    let f = fake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.set(PodState::Pending);
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.set(PodState::Captured);
    });
    let r = handle(&reg, fake.as_ref(), add(NETNS), Duration::from_secs(5)).await;
    assert!(r.ok && r.enrolled, "{r:?}");
}

#[tokio::test]
async fn add_with_a_missing_netns_is_refused_and_del_always_succeeds() {
    let reg = PodRegistry::load(None);
    let fake = Fake::new(PodState::Captured, None);
    let r = handle(&reg, fake.as_ref(), add("/nonexistent/netns"), WAIT).await;
    assert!(!r.ok && r.error.contains("does not exist"), "{r:?}");
    let mut del = add(NETNS);
    del.command = Command::Del;
    assert!(handle(&reg, fake.as_ref(), del, WAIT).await.ok);
}
