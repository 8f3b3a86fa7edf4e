//! A real ZooKeeper ensemble for tests: `size` servers on free loopback ports
//! (`server.N=127.0.0.1:peer:election`, a `myid` file each, data in the temp dir), started
//! with Debian's java and zookeeper.jar as `zkServer.sh start-foreground` would; killed and
//! removed on drop. The leader is found with the `srvr` four-letter word (enabled with
//! `4lw.commands.whitelist=*`); writes go through a session of the test's own.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zookeeper_client as zk;

use super::free_port;

/// Debian's classpath for the server (`/usr/share/zookeeper/bin/zkEnv.sh`).
const CLASSPATH: &str = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar";

/// One server of a [`ZookeeperEnsemble`].
pub struct ZookeeperServer {
    child: Option<Child>,
    pub id: usize,
    pub client_port: u16,
    dir: PathBuf,
}

impl ZookeeperServer {
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The answer to a four-letter word (`srvr`, `ruok`, `cons`), or "" when none.
    pub fn four_letter(&self, word: &str) -> String {
        let Ok(mut stream) = TcpStream::connect(self.address()) else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(word.as_bytes()).is_err() {
            return String::new();
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    }

    /// `leader`, `follower`, `standalone`, or `None` when not serving.
    pub fn mode(&self) -> Option<String> {
        let answer = self.four_letter("srvr");
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Mode: "))
            .map(|m| m.trim().to_owned())
    }
}

/// `size` ZooKeeper servers forming one ensemble.
pub struct ZookeeperEnsemble {
    pub servers: Vec<ZookeeperServer>,
    peers: Vec<(u16, u16)>,
}

impl ZookeeperEnsemble {
    /// Starts the servers and waits until a leader serves (3 tries on new ports).
    pub async fn start(size: usize) -> ZookeeperEnsemble {
        for _ in 0..3 {
            let tag = free_port();
            let servers = (1..=size)
                .map(|id| ZookeeperServer {
                    child: None,
                    id,
                    client_port: free_port(),
                    dir: std::env::temp_dir().join(format!("switchyard-test-zk-{tag}-{id}")),
                })
                .collect();
            let peers = (0..size).map(|_| (free_port(), free_port())).collect();
            let mut ensemble = ZookeeperEnsemble { servers, peers };
            for i in 0..size {
                ensemble.spawn(i);
            }
            if ensemble
                .wait_for_leader(Duration::from_secs(60))
                .await
                .is_some()
            {
                return ensemble;
            }
            eprintln!(
                "zookeeper: no leader; log of server 1:\n{}",
                ensemble.log(0)
            );
        }
        panic!("the ZooKeeper ensemble elected no leader in 3 tries");
    }

    fn config(&self, i: usize) -> String {
        let server = &self.servers[i];
        let mut text = format!(
            "tickTime=200\ninitLimit=50\nsyncLimit=10\ndataDir={}\nclientPort={}\n\
             clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
             4lw.commands.whitelist=*\nmaxSessionTimeout=60000\n",
            server.dir.join("data").display(),
            server.client_port
        );
        for (s, (peer, election)) in self.servers.iter().zip(&self.peers) {
            text.push_str(&format!("server.{}=127.0.0.1:{peer}:{election}\n", s.id));
        }
        text
    }

    fn spawn(&mut self, i: usize) {
        let config = self.config(i);
        let server = &mut self.servers[i];
        let data = server.dir.join("data");
        std::fs::create_dir_all(&data).expect("creating a zookeeper data dir");
        std::fs::write(data.join("myid"), format!("{}\n", server.id)).expect("writing myid");
        let cfg = server.dir.join("zoo.cfg");
        std::fs::write(&cfg, config).expect("writing zoo.cfg");
        let log = std::fs::File::create(server.dir.join("server.log"))
            .expect("creating the zookeeper log");
        // A small serial-GC heap with the client compiler: three JVMs start faster on a
        // shared 2-core machine and hold ~60 MB each.
        let child = Command::new("java")
            .args(["-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg("-Dzookeeper.root.logger=INFO,CONSOLE")
            .arg(format!("-Dzookeeper.log.dir={}", server.dir.display()))
            .args([
                "-cp",
                CLASSPATH,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            ])
            .arg(&cfg)
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting java (ZooKeeper missing? run scripts/install-zookeeper.sh)");
        server.child = Some(child);
    }

    /// The last lines of server `i`'s log.
    pub fn log(&self, i: usize) -> String {
        let text =
            std::fs::read_to_string(self.servers[i].dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Every server's `host:port`, for `zookeeper.servers`.
    pub fn servers(&self) -> Vec<String> {
        self.servers.iter().map(ZookeeperServer::address).collect()
    }

    /// The connect string of the running servers.
    pub fn connect_string(&self) -> String {
        let running: Vec<String> = self
            .servers
            .iter()
            .filter(|s| s.is_running())
            .map(ZookeeperServer::address)
            .collect();
        running.join(",")
    }

    /// The index of the server in `leader` mode (standalone counts, for an ensemble of one).
    pub async fn leader(&self) -> Option<usize> {
        let servers: Vec<(usize, String)> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_running())
            .map(|(i, s)| (i, s.address()))
            .collect();
        tokio::task::spawn_blocking(move || {
            servers.into_iter().find_map(|(i, address)| {
                let probe = ZookeeperServer {
                    child: None,
                    id: 0,
                    client_port: address.rsplit(':').next()?.parse().ok()?,
                    dir: PathBuf::new(),
                };
                matches!(probe.mode().as_deref(), Some("leader" | "standalone")).then_some(i)
            })
        })
        .await
        .ok()
        .flatten()
    }

    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<usize> {
        super::poll_some(timeout, || self.leader()).await
    }

    /// Kills server `i` at once (SIGKILL), as a crash.
    pub fn kill(&mut self, i: usize) {
        super::kill_child(&mut self.servers[i].child);
    }

    /// Starts server `i` again on its ports and data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// A new session of the test's own on the running servers.
    pub async fn session(&self, timeout: Duration) -> zk::Client {
        let start = Instant::now();
        let servers = self.connect_string();
        loop {
            let connect = zk::Client::connector()
                .with_session_timeout(timeout)
                .connect(&servers);
            match tokio::time::timeout(Duration::from_secs(10), connect).await {
                Ok(Ok(client)) => return client,
                Ok(Err(error)) => eprintln!("zookeeper connect failed (retrying): {error}"),
                Err(_) => eprintln!("zookeeper connect timed out (retrying)"),
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no ZooKeeper session"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Creates `path` and its parents as persistent nodes (existing ones are fine).
pub async fn mkdir(client: &zk::Client, path: &str) {
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    client
        .mkdir(path, &options)
        .await
        .expect("creating the service path");
}

/// Registers `address` as an ephemeral sequential child of `path` (go-kit's `sd/zk`
/// layout), on `client`'s session; returns the node's path.
pub async fn register(client: &zk::Client, path: &str, address: &str) -> String {
    try_register(client, path, address)
        .await
        .expect("creating an ephemeral sequential node")
}

/// [`register`], with ZooKeeper's error instead of a panic.
pub async fn try_register(
    client: &zk::Client,
    path: &str,
    address: &str,
) -> Result<String, zk::Error> {
    let directory = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    client.mkdir(path, &directory).await?;
    let options = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
    let prefix = format!("{path}/instance-");
    let (_, sequence) = client.create(&prefix, address.as_bytes(), &options).await?;
    Ok(format!("{prefix}{sequence}"))
}

impl Drop for ZookeeperEnsemble {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.servers[i].dir);
        }
    }
}
