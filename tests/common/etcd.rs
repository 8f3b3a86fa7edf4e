//! A real etcd cluster for tests: `size` members on free loopback ports with data directories
//! in the temp dir, formed with `--initial-cluster`; killed and removed on drop. Helpers find
//! and kill the leader (maintenance `Status` of each member) and write keys with retries
//! (a write during an election fails; the test means "once the cluster takes it").

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, PutOptions};

use super::free_port;

/// One `etcd` member of an [`EtcdCluster`].
pub struct EtcdMember {
    child: Option<Child>,
    /// Frozen by [`EtcdCluster::pause`]: the test's own clients leave it alone.
    paused: bool,
    pub name: String,
    pub client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Started, and neither killed nor paused.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && !self.paused
    }
}

/// `size` etcd members that form one cluster.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    token: String,
}

impl EtcdCluster {
    /// Starts the members and waits until they elected a leader (3 tries on new ports: a
    /// port picked free can be taken before etcd binds it).
    pub async fn start(size: usize) -> EtcdCluster {
        for _ in 0..3 {
            let token = format!("switchyard-{}", free_port());
            let members = (0..size)
                .map(|i| {
                    let client_port = free_port();
                    EtcdMember {
                        child: None,
                        paused: false,
                        name: format!("m{i}"),
                        client_port,
                        peer_port: free_port(),
                        data_dir: std::env::temp_dir()
                            .join(format!("switchyard-test-etcd-{token}-{i}")),
                    }
                })
                .collect();
            let mut cluster = EtcdCluster { members, token };
            for i in 0..size {
                cluster.spawn(i);
            }
            if cluster
                .wait_for_leader(Duration::from_secs(20))
                .await
                .is_some()
            {
                return cluster;
            }
            eprintln!("etcd: no leader; log of m0:\n{}", cluster.log(0));
        }
        panic!("the etcd cluster elected no leader in 3 tries");
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &mut self.members[i];
        std::fs::create_dir_all(&member.data_dir).expect("creating an etcd data dir");
        let log = std::fs::File::create(member.data_dir.with_extension("log"))
            .expect("creating the etcd log");
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(member.data_dir.join("data"))
            .args(["--listen-client-urls", &member.endpoint()])
            .args(["--advertise-client-urls", &member.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // A new leader within ~0.5 s of a crash instead of etcd's 1 s election timeout
            // (100 ms heartbeats): the leader drills wait for it.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting `etcd` (not on PATH? run scripts/install-etcd.sh)");
        member.child = Some(child);
    }

    /// The last lines of member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.members[i].data_dir.with_extension("log"))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Every member's client URL, for `etcd.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// A client of the running members.
    pub async fn client(&self) -> Client {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.is_running())
            .map(EtcdMember::endpoint)
            .collect();
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        Client::connect(endpoints, Some(options))
            .await
            .expect("an etcd client")
    }

    /// The index of the member that is leader, as the running members report it.
    pub async fn leader(&self) -> Option<usize> {
        for member in self.members.iter().filter(|m| m.is_running()) {
            let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
            let Ok(mut client) = Client::connect([member.endpoint()], Some(options)).await else {
                continue;
            };
            let status = tokio::time::timeout(Duration::from_secs(1), client.status()).await;
            let Ok(Ok(status)) = status else { continue };
            let leader = status.leader();
            if leader == 0 {
                continue;
            }
            let Ok(Ok(list)) =
                tokio::time::timeout(Duration::from_secs(1), client.member_list()).await
            else {
                continue;
            };
            let Some(name) = list
                .members()
                .iter()
                .find(|m| m.id() == leader)
                .map(|m| m.name().to_owned())
            else {
                continue;
            };
            if let Some(i) = self
                .members
                .iter()
                .position(|m| m.name == name && m.is_running())
            {
                return Some(i);
            }
        }
        None
    }

    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<usize> {
        super::poll_some(timeout, || self.leader()).await
    }

    /// The members that serve at least one watch (etcd's `etcd_debugging_mvcc_watcher_total`
    /// gauge on each running member's `/metrics`): where a client's watch streams go.
    pub async fn watching_members(&self) -> Vec<usize> {
        let client = super::http_client();
        let mut watching = Vec::new();
        for (i, member) in self.members.iter().enumerate() {
            if !member.is_running() {
                continue;
            }
            let url = format!("{}/metrics", member.endpoint());
            let get = client.get(url).timeout(Duration::from_secs(1)).send();
            let Ok(response) = get.await else {
                continue;
            };
            let text = response.text().await.unwrap_or_default();
            if super::metric(&text, "etcd_debugging_mvcc_watcher_total") > 0.0 {
                watching.push(i);
            }
        }
        watching
    }

    /// The one member serving watches, once exactly one does (within `timeout`).
    pub async fn wait_for_watching_member(&self, timeout: Duration) -> Option<usize> {
        super::poll_some(timeout, || async {
            match self.watching_members().await[..] {
                [one] => Some(one),
                _ => None,
            }
        })
        .await
    }

    /// Freezes member `i` (SIGSTOP): its sockets stay open and the kernel still accepts
    /// connections and data for it, but nothing answers, as a hung or cut-off host.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, "-STOP");
        self.members[i].paused = true;
    }

    /// Thaws member `i` (SIGCONT) after [`Self::pause`].
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.members[i].paused = false;
    }

    /// Makes member `i` a follower: if it leads, it hands leadership to another running
    /// member (etcd's `MoveLeader`, no election timeout to wait out) and this waits for it.
    pub async fn make_follower(&self, i: usize, timeout: Duration) {
        if self.leader().await != Some(i) {
            return;
        }
        let mut client = member_client(&self.members[i]).await;
        let members = client.member_list().await.expect("etcd member list");
        let target = members
            .members()
            .iter()
            .find(|m| m.name() != self.members[i].name)
            .expect("another member")
            .id();
        client.move_leader(target).await.expect("etcd move-leader");
        let moved = super::poll_some(timeout, || async {
            self.leader().await.filter(|&leader| leader != i)
        })
        .await;
        assert!(moved.is_some(), "member {i} still leads");
    }

    /// Waits until member `i` answers a linearizable read (it has a leader and caught up).
    pub async fn wait_until_serving(&self, i: usize, timeout: Duration) -> Option<Duration> {
        let member = &self.members[i];
        super::wait_until(timeout, || async {
            let read = async { member_client(member).await.get("/", None).await };
            matches!(
                tokio::time::timeout(Duration::from_secs(1), read).await,
                Ok(Ok(_))
            )
        })
        .await
    }

    fn signal(&self, i: usize, signal: &str) {
        let child = self.members[i].child.as_ref().expect("a running member");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} member {i}");
    }

    /// Kills member `i` at once (SIGKILL), as a crash.
    pub fn kill(&mut self, i: usize) {
        super::kill_child(&mut self.members[i].child);
        self.members[i].paused = false;
    }

    /// Starts member `i` again on its ports and data (it rejoins with its state).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Writes `key` (retried for 30 s while the cluster has no leader); returns its revision.
    pub async fn put(&self, key: &str, value: &str) -> i64 {
        self.put_with(key, value, None).await
    }

    /// Writes `key` held by a new lease of `ttl` seconds (not kept alive); returns the lease.
    pub async fn put_with_lease(&self, key: &str, value: &str, ttl: i64) -> i64 {
        let lease = retry("lease grant", || async {
            self.client().await.lease_grant(ttl, None).await
        })
        .await
        .id();
        self.put_with(key, value, Some(PutOptions::new().with_lease(lease)))
            .await;
        lease
    }

    async fn put_with(&self, key: &str, value: &str, options: Option<PutOptions>) -> i64 {
        retry("put", || async {
            self.client().await.put(key, value, options.clone()).await
        })
        .await
        .header()
        .map_or(0, |h| h.revision())
    }

    pub async fn delete(&self, key: &str) {
        retry("delete", || async {
            self.client().await.delete(key, None).await
        })
        .await;
    }
}

/// A client of `member` alone.
async fn member_client(member: &EtcdMember) -> Client {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
    Client::connect([member.endpoint()], Some(options))
        .await
        .expect("an etcd client")
}

/// Runs `op` until it succeeds, for at most 30 s (each try bounded by 3 s).
async fn retry<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), op()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(error)) => eprintln!("etcd {what} failed (retrying): {error}"),
            Err(_) => eprintln!("etcd {what} timed out (retrying)"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "etcd {what} kept failing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.members[i].data_dir);
            let _ = std::fs::remove_file(self.members[i].data_dir.with_extension("log"));
        }
    }
}
