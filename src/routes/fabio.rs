//! fabio's route language, as switchyard understands it:
//!
//! - service tags `<prefix>[host]/path [opt=value ...]` (`urlprefix-/api strip=/api`), and
//! - the manual commands fabio reads from Consul KV: `route add <svc> <src> <dst> [weight
//!   <w>] [tags "<t>,..."] [opts "<k=v> ..."]`, `route del <svc> [<src> [<dst>]]`,
//!   `route weight <svc> <src> weight <w>`.
//!
//! Options honoured: `strip=`, `prepend=`, `proto=http|https|grpc|grpcs` (`tcp` is not
//! proxied), `tlsskipverify=true`, `weight=`, `redirect=<code>,<url>`, `allow=`/`deny=`
//! (`ip:<cidr>,...`). A tag using anything else is not routed; the reason is returned for
//! `/routes`.

use std::fmt;

use ipnet::IpNet;

/// How requests reach the instances of a tag route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proto {
    #[default]
    Http,
    /// HTTP/1.1 over TLS.
    Https,
    /// gRPC over h2c (fabio's `proto=grpc`).
    Grpc,
    /// gRPC over TLS (HTTP/2, ALPN).
    Grpcs,
}

/// Client addresses a route admits (`allow=`) or refuses (`deny=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub allow: bool,
    pub nets: Vec<IpNet>,
}

impl Access {
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip)) == self.allow
    }
}

/// `redirect=<code>,<url>`: answered by the gateway; `$path` in the URL is the request's
/// path and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub code: u16,
    pub url: String,
}

/// The options of one route.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteOptions {
    pub strip: Option<String>,
    pub prepend: Option<String>,
    pub proto: Proto,
    /// `tlsskipverify=true`: accept any certificate of a TLS instance.
    pub tls_skip_verify: bool,
    /// This service's share of the route (0 to 1) when several serve it.
    pub weight: Option<f64>,
    pub redirect: Option<Redirect>,
    pub access: Option<Access>,
}

/// A route source: an optional host (exact, or `*.domain`) and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    /// Lower case, without port; `None`: any host.
    pub host: Option<String>,
    pub path: String,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.host.as_deref().unwrap_or(""), self.path)
    }
}

/// One route from a service tag.
#[derive(Debug, Clone, PartialEq)]
pub struct TagRoute {
    pub source: Source,
    pub options: RouteOptions,
}

/// Why a tag or command is not honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhonoured {
    #[error("no path: a route needs at least one '/' (TCP routes like ':3306' are not proxied)")]
    NoPath,
    #[error("proto={0} is not supported (http, https, grpc and grpcs are)")]
    Proto(String),
    #[error("option {0}= is not supported")]
    Option(String),
    #[error("{option}={value:?} is not valid")]
    Value { option: String, value: String },
    #[error("both allow= and deny= are set")]
    AllowAndDeny,
    #[error("unreadable command: {0}")]
    Command(String),
}

/// The route of `tag`, if it starts with `prefix`: `None` for other tags.
pub fn parse_tag(prefix: &str, tag: &str) -> Option<Result<TagRoute, Unhonoured>> {
    let rest = tag.strip_prefix(prefix)?;
    let mut words = rest.split_whitespace();
    let source = words.next().unwrap_or("");
    Some(parse_source(source).and_then(|source| {
        let options = parse_options(words)?;
        Ok(TagRoute { source, options })
    }))
}

/// `[host]/path`; a host's port is dropped (routes match the host name).
pub fn parse_source(text: &str) -> Result<Source, Unhonoured> {
    let slash = text.find('/').ok_or(Unhonoured::NoPath)?;
    let (host, path) = text.split_at(slash);
    let host = host.split(':').next().unwrap_or("").to_ascii_lowercase();
    Ok(Source {
        host: Some(host).filter(|h| !h.is_empty()),
        path: path.to_owned(),
    })
}

/// `key=value` words.
pub fn parse_options<'a>(words: impl Iterator<Item = &'a str>) -> Result<RouteOptions, Unhonoured> {
    let mut options = RouteOptions::default();
    for word in words {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        parse_option(&mut options, key, value)?;
    }
    Ok(options)
}

fn bad(option: &str, value: &str) -> Unhonoured {
    Unhonoured::Value {
        option: option.to_owned(),
        value: value.to_owned(),
    }
}

fn parse_option(options: &mut RouteOptions, key: &str, value: &str) -> Result<(), Unhonoured> {
    match key {
        "strip" | "prepend" if !value.starts_with('/') => return Err(bad(key, value)),
        "strip" => options.strip = Some(value.trim_end_matches('/').to_owned()),
        "prepend" => options.prepend = Some(value.trim_end_matches('/').to_owned()),
        "proto" => {
            options.proto = match value {
                "http" => Proto::Http,
                "https" => Proto::Https,
                "grpc" => Proto::Grpc,
                "grpcs" => Proto::Grpcs,
                other => return Err(Unhonoured::Proto(other.to_owned())),
            }
        }
        "tlsskipverify" if matches!(value, "true" | "false") => {
            options.tls_skip_verify = value == "true";
        }
        "weight" => options.weight = Some(parse_weight(value)?),
        "redirect" => options.redirect = Some(parse_redirect(value)?),
        "allow" | "deny" => {
            if options.access.is_some() {
                return Err(Unhonoured::AllowAndDeny);
            }
            options.access = Some(parse_access(key == "allow", value)?);
        }
        other => return Err(Unhonoured::Option(other.to_owned())),
    }
    Ok(())
}

/// A share between 0 and 1.
pub fn parse_weight(value: &str) -> Result<f64, Unhonoured> {
    match value.parse::<f64>() {
        Ok(w) if (0.0..=1.0).contains(&w) => Ok(w),
        _ => Err(bad("weight", value)),
    }
}

fn parse_redirect(value: &str) -> Result<Redirect, Unhonoured> {
    let (code, url) = value
        .split_once(',')
        .ok_or_else(|| bad("redirect", value))?;
    match code.parse::<u16>() {
        Ok(code @ 300..=399) if !url.is_empty() => Ok(Redirect {
            code,
            url: url.to_owned(),
        }),
        _ => Err(bad("redirect", value)),
    }
}

fn parse_access(allow: bool, value: &str) -> Result<Access, Unhonoured> {
    let key = if allow { "allow" } else { "deny" };
    let nets = value
        .split(',')
        .map(|item| {
            let cidr = item.strip_prefix("ip:").ok_or_else(|| bad(key, item))?;
            cidr.parse::<IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| bad(key, item))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Access { allow, nets })
}

/// One manual command from Consul KV.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A route to a fixed address (`dst` is `http://host:port[/]`).
    Add {
        service: String,
        source: Source,
        dst: String,
        weight: Option<f64>,
        options: RouteOptions,
    },
    /// Removes the service's routes (on `source`, when given).
    Del {
        service: String,
        source: Option<Source>,
    },
    /// Sets the service's share of the route on `source`.
    Weight {
        service: String,
        source: Source,
        weight: f64,
    },
}

/// The commands of a KV value, one per line (`#` comments and blank lines skipped), with
/// the lines that could not be honoured and why.
pub fn parse_commands(text: &str) -> (Vec<Command>, Vec<(String, Unhonoured)>) {
    let mut commands = Vec::new();
    let mut errors = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_command(&words(line)) {
            Ok(command) => commands.push(command),
            Err(error) => errors.push((line.to_owned(), error)),
        }
    }
    (commands, errors)
}

/// Whitespace-separated words; double quotes group.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn parse_command(words: &[String]) -> Result<Command, Unhonoured> {
    let unreadable = || Unhonoured::Command(words.join(" "));
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["route", "add", service, source, dst, rest @ ..] => {
            let (weight, options) = add_extras(rest)?;
            Ok(Command::Add {
                service: service.to_string(),
                source: parse_source(source)?,
                dst: dst.to_string(),
                weight,
                options,
            })
        }
        ["route", "del", service] | ["route", "del", service, _, ..] if *service != "tags" => {
            Ok(Command::Del {
                service: service.to_string(),
                source: w.get(3).map(|s| parse_source(s)).transpose()?,
            })
        }
        ["route", "weight", service, source, "weight", weight] => Ok(Command::Weight {
            service: service.to_string(),
            source: parse_source(source)?,
            weight: parse_weight(weight)?,
        }),
        ["route", "weight", ..] | ["route", "del", ..] if w.contains(&"tags") => {
            Err(Unhonoured::Command(format!(
                "{} (selecting by tags is not supported)",
                words.join(" ")
            )))
        }
        _ => Err(unreadable()),
    }
}

/// The text of fabio's manual commands from a Consul `?recurse` answer on `path`: the key's
/// own value, then each sub-key's (`path/...`) in key order, each headed by a `# <key>`
/// comment, as fabio (since 1.5.3) reads `registry.consul.kvpath` as a prefix. Keys that
/// merely start with the same letters (`path-old`) are not part of it; an empty answer (the
/// key does not exist) is no commands.
pub fn kv_text(path: &str, answer: &[u8]) -> Result<String, KvError> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Key")]
        key: String,
        #[serde(rename = "Value")]
        value: Option<String>,
    }
    if answer.iter().all(u8::is_ascii_whitespace) {
        return Ok(String::new());
    }
    let mut entries: Vec<Entry> = serde_json::from_slice(answer)?;
    let path = path.trim_matches('/');
    entries.retain(|e| {
        let key = e.key.trim_end_matches('/');
        key == path
            || key
                .strip_prefix(path)
                .is_some_and(|rest| rest.starts_with('/'))
    });
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let mut text = String::new();
    for entry in entries {
        use base64::Engine as _;
        let value = base64::engine::general_purpose::STANDARD
            .decode(entry.value.unwrap_or_default())
            .map_err(|_| KvError::Encoding(entry.key.clone()))?;
        text.push_str(&format!("# {}\n", entry.key));
        text.push_str(&String::from_utf8_lossy(&value));
        text.push('\n');
    }
    Ok(text)
}

/// A KV answer that is not what Consul sends.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("not Consul's KV JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the value of {0:?} is not base64")]
    Encoding(String),
}

/// `[weight <w>] [tags "..."] [opts "..."]` after `route add`.
fn add_extras(rest: &[&str]) -> Result<(Option<f64>, RouteOptions), Unhonoured> {
    let mut weight = None;
    let mut options = RouteOptions::default();
    for pair in rest.chunks(2) {
        match pair {
            ["weight", w] => weight = Some(parse_weight(w)?),
            ["tags", _] => {}
            ["opts", opts] => options = parse_options(opts.split_whitespace())?,
            other => return Err(Unhonoured::Command(other.join(" "))),
        }
    }
    Ok((weight, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(tag: &str) -> Result<TagRoute, Unhonoured> {
        parse_tag("urlprefix-", tag).expect("a route tag")
    }

    #[test]
    fn kv_sub_keys_are_concatenated_in_key_order() {
        use base64::Engine as _;
        let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        let answer = format!(
            r#"[{{"Key":"fabio/config/b","Value":"{}"}},{{"Key":"fabio/config","Value":"{}"}},
               {{"Key":"fabio/config/a","Value":"{}"}},{{"Key":"fabio/configx","Value":"{}"}},
               {{"Key":"fabio/config/dir/","Value":null}}]"#,
            b64("route del b"),
            b64("route del main"),
            b64("route del a"),
            b64("route del x"),
        );
        let text = kv_text("/fabio/config", answer.as_bytes()).unwrap();
        let (commands, errors) = parse_commands(&text);
        let services: Vec<_> = commands
            .iter()
            .map(|c| match c {
                Command::Del { service, .. } => service.as_str(),
                _ => "?",
            })
            .collect();
        assert_eq!(services, ["main", "a", "b"]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(kv_text("fabio/config", b"").unwrap(), "");
        assert!(kv_text("fabio/config", b"{").is_err());
    }

    /// fabio's quickstart tags, verbatim.
    #[test]
    fn quickstart_tags() {
        let css = route("urlprefix-/css").unwrap();
        assert_eq!((css.source.host, css.source.path.as_str()), (None, "/css"));
        let host = route("urlprefix-i.com/static").unwrap();
        assert_eq!(host.source.host.as_deref(), Some("i.com"));
        assert_eq!(host.source.path, "/static");
        let all = route("urlprefix-mysite.com/").unwrap();
        assert_eq!(all.source.to_string(), "mysite.com/");
        let strip = route("urlprefix-/foo/bar strip=/foo").unwrap();
        assert_eq!(strip.options.strip.as_deref(), Some("/foo"));
        let https = route("urlprefix-/foo/bar proto=https").unwrap();
        let (proto, skip) = (https.options.proto, https.options.tls_skip_verify);
        assert_eq!((proto, skip), (Proto::Https, false));
        let insecure = route("urlprefix-/foo/bar proto=https tlsskipverify=true").unwrap();
        let (proto, skip) = (insecure.options.proto, insecure.options.tls_skip_verify);
        assert_eq!((proto, skip), (Proto::Https, true));
        let tcp = route("urlprefix-/a proto=tcp");
        assert_eq!(tcp, Err(Unhonoured::Proto("tcp".into())));
        assert_eq!(route("urlprefix-:3306 proto=tcp"), Err(Unhonoured::NoPath));
        assert!(parse_tag("urlprefix-", "v1").is_none());
    }

    #[test]
    fn options() {
        let r = route("urlprefix-*.Example.com/api prepend=/v2 proto=grpc weight=0.05 allow=ip:10.0.0.0/8,ip:fe80::/10").unwrap();
        assert_eq!(r.source.host.as_deref(), Some("*.example.com"));
        assert_eq!(r.options.prepend.as_deref(), Some("/v2"));
        assert_eq!(r.options.proto, Proto::Grpc);
        assert_eq!(r.options.weight, Some(0.05));
        let access = r.options.access.unwrap();
        assert!(access.admits("10.1.2.3".parse().unwrap()));
        assert!(!access.admits("192.168.1.1".parse().unwrap()));
        let r = route("urlprefix-/old redirect=301,https://example.com$path").unwrap();
        assert_eq!(
            r.options.redirect,
            Some(Redirect {
                code: 301,
                url: "https://example.com$path".into()
            })
        );
        assert_eq!(
            route("urlprefix-/a auth=basic"),
            Err(Unhonoured::Option("auth".into()))
        );
        assert!(route("urlprefix-/a weight=2").is_err());
        assert_eq!(
            route("urlprefix-/a allow=ip:10.0.0.0/8 deny=ip:10.1.0.0/16"),
            Err(Unhonoured::AllowAndDeny)
        );
    }

    #[test]
    fn commands() {
        let text = "# manual overrides\n\
            route add static /static http://10.0.0.9:8080/ weight 0.2 opts \"strip=/static\"\n\
            route del web\n\
            route del api /api\n\
            route weight web-v2 /web weight 0.05\n\
            route weight /web weight 0.05 tags \"canary\"\n\
            bogus\n";
        let (commands, errors) = parse_commands(text);
        assert_eq!(commands.len(), 4, "{commands:?}");
        assert!(
            matches!(&commands[0], Command::Add { weight: Some(w), options, .. } if *w == 0.2 && options.strip.as_deref() == Some("/static"))
        );
        assert_eq!(
            commands[1],
            Command::Del {
                service: "web".into(),
                source: None
            }
        );
        assert!(
            matches!(&commands[3], Command::Weight { service, weight, .. } if service == "web-v2" && *weight == 0.05)
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
