//! Routes found at run time: from Consul service tags in fabio's grammar ([`fabio`]) and
//! from fabio's manual commands in Consul KV. The tag-route watcher writes a whole
//! [`DynamicRoutes`] and publishes it; the gateway's router merges it with the config
//! file's routes (the file wins). Like the upstream tables, this is where discovery and the
//! gateway meet without importing each other.

pub mod fabio;

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::upstream::Upstream;
pub use fabio::{Access, Proto, Redirect, RouteOptions, Source, Unhonoured};

/// Where a route comes from, as `/routes` and the status page show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `services[].route` in the config file.
    File,
    /// A service tag.
    Tag { service: String, tag: String },
    /// A `route add` command in Consul KV.
    Kv { line: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File => f.write_str("file"),
            Origin::Tag { service, tag } => write!(f, "tag of service {service}: {tag}"),
            Origin::Kv { line } => write!(f, "KV: {line}"),
        }
    }
}

impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One service serving a dynamic route, with its own options.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub options: RouteOptions,
    pub origin: Origin,
}

/// A host and path with the services that serve it.
#[derive(Clone)]
pub struct DynamicRoute {
    pub source: Source,
    pub targets: Vec<Target>,
}

/// A tag or command that is not routed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The service whose tag it is, or `KV`.
    pub origin: String,
    pub text: String,
    pub reason: String,
}

/// Every dynamic route at one moment, built whole by the tag-route watcher.
#[derive(Clone, Default)]
pub struct DynamicRoutes {
    pub routes: Vec<DynamicRoute>,
    pub skipped: Vec<Skipped>,
}

impl DynamicRoutes {
    /// Whether `other` routes the same sources to the same upstreams with the same options
    /// (so publishing it would change nothing).
    pub fn same_as(&self, other: &DynamicRoutes) -> bool {
        self.skipped == other.skipped
            && self.routes.len() == other.routes.len()
            && self.routes.iter().zip(&other.routes).all(|(a, b)| {
                a.source == b.source
                    && a.targets.len() == b.targets.len()
                    && a.targets.iter().zip(&b.targets).all(|(x, y)| {
                        Arc::ptr_eq(&x.upstream, &y.upstream)
                            && x.options == y.options
                            && x.origin == y.origin
                    })
            })
    }
}
