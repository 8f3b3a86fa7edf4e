//! Self-registration in etcd and ZooKeeper with go-kit's registrar layouts, for `hello
//! --registry etcd|zookeeper` (Consul's stays in `hello.rs`). Included with
//! `#[path = "support/registry.rs"] mod registry;`.
//!
//! - etcd (`sd/etcdv3`): a lease of `ttl` seconds kept alive every `ttl/3`, and the key
//!   `/services/<name>/<id>` with the value `host:port` on it. Stopping deletes the key and
//!   revokes the lease; a crash lets the lease expire, and the key with it.
//! - ZooKeeper (`sd/zk`): a *protected* ephemeral sequential node under `/services/<name>`
//!   (`_c_<random>-<id>-<sequence>`: a create retried after a lost connection can find its own
//!   node by the random part instead of leaving a twin), data `host:port`. Stopping deletes it;
//!   a crash ends the session, and the node with it.

use std::time::Duration;

use anyhow::Context;
use etcd_client::{Client, PutOptions};
use tokio::task::JoinHandle;
use zookeeper_client as zk;

/// An instance registered in etcd, its lease kept alive until `deregister`.
pub struct EtcdRegistration {
    client: Client,
    key: String,
    lease: i64,
    keeper: JoinHandle<()>,
}

impl EtcdRegistration {
    pub async fn register(
        endpoints: &[String],
        name: &str,
        id: &str,
        address: &str,
        ttl: i64,
    ) -> anyhow::Result<Self> {
        let mut client = Client::connect(endpoints, None)
            .await
            .context("connecting to etcd")?;
        let lease = client
            .lease_grant(ttl, None)
            .await
            .context("granting a lease")?
            .id();
        let key = format!("/services/{name}/{id}");
        client
            .put(
                key.as_str(),
                address,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .context("putting the instance key")?;
        let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl));
        Ok(Self {
            client,
            key,
            lease,
            keeper,
        })
    }

    pub async fn deregister(mut self) -> anyhow::Result<()> {
        self.keeper.abort();
        self.client.delete(self.key.as_str(), None).await?;
        self.client.lease_revoke(self.lease).await?;
        Ok(())
    }
}

/// Renews `lease` every `ttl/3` (at least every second), reopening the stream on errors.
async fn keep_alive(mut client: Client, lease: i64, ttl: i64) {
    let every = Duration::from_secs(u64::try_from(ttl / 3).unwrap_or(1).max(1));
    loop {
        let Ok((mut keeper, mut responses)) = client.lease_keep_alive(lease).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        loop {
            if keeper.keep_alive().await.is_err()
                || !matches!(responses.message().await, Ok(Some(_)))
            {
                eprintln!("etcd lease keep-alive failed; reconnecting");
                break;
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// An instance registered in ZooKeeper, held by this session.
pub struct ZookeeperRegistration {
    client: zk::Client,
    node: String,
}

impl ZookeeperRegistration {
    pub async fn register(
        servers: &str,
        name: &str,
        id: &str,
        address: &str,
    ) -> anyhow::Result<Self> {
        let client = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(servers)
            .await
            .context("connecting to ZooKeeper")?;
        let path = format!("/services/{name}");
        let directory = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        client
            .mkdir(&path, &directory)
            .await
            .context("creating the service path")?;
        let prefix = format!("{path}/_c_{:016x}-{id}-", fastrand::u64(..));
        let ephemeral = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let (_, sequence) = client
            .create(&prefix, address.as_bytes(), &ephemeral)
            .await
            .context("creating the instance node")?;
        Ok(Self {
            client,
            node: format!("{prefix}{sequence}"),
        })
    }

    pub async fn deregister(self) -> anyhow::Result<()> {
        self.client.delete(&self.node, None).await?;
        Ok(())
    }
}
