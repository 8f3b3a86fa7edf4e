//! What the container image promises, checked without a container engine: the binary, given
//! the image's environment and the config file the image copies, listens where `EXPOSE` and
//! the `HEALTHCHECK` expect, and the image does not run as root. (`hadolint` lints the
//! Dockerfile itself in scripts/test.sh.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const CONFIG_IN_IMAGE: &str = "/etc/switchyard/gateway.yaml";

/// The Dockerfile's instructions of the final stage, as (instruction, arguments), with
/// comments dropped and `\` continuations joined.
fn final_stage() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let text = std::fs::read_to_string(path).expect("reading the Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (instruction, args) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((instruction.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("a FROM instruction");
    instructions.split_off(last_from)
}

fn args_of<'a>(stage: &'a [(String, String)], instruction: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(i, _)| i == instruction)
        .map(|(_, a)| a.as_str())
        .collect()
}

fn port_of(address: &str) -> &str {
    address.rsplit(':').next().unwrap_or_default()
}

#[test]
fn image_environment_exposes_what_the_healthcheck_and_expose_expect() {
    let stage = final_stage();

    let env: BTreeMap<&str, &str> = args_of(&stage, "ENV")
        .into_iter()
        .map(|pair| {
            pair.split_once('=')
                .unwrap_or_else(|| panic!("ENV {pair:?}: write one KEY=value per ENV"))
        })
        .collect();
    assert_eq!(env.get("SWITCHYARD_CONFIG"), Some(&CONFIG_IN_IMAGE));
    assert!(
        args_of(&stage, "COPY")
            .iter()
            .any(|copy| *copy == format!("gateway.yaml {CONFIG_IN_IMAGE}")),
        "the image must copy gateway.yaml to {CONFIG_IN_IMAGE}"
    );

    // The image's environment on the file the image copies (which is not at its in-image
    // path here), and no `--config`: the path must come from SWITCHYARD_CONFIG.
    let repo_config = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.yaml");
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--print-config")
        .envs(env.iter().filter(|(k, _)| **k != "SWITCHYARD_CONFIG"))
        .env("SWITCHYARD_CONFIG", &repo_config)
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .expect("running switchyard --print-config");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let effective: Value = serde_json::from_slice(&output.stdout).expect("--print-config JSON");
    let listen = effective["listen"].as_str().expect("listen");
    let admin = effective["admin_listen"].as_str().expect("admin_listen");
    // Reachable from outside the container, unlike the 127.0.0.1 default.
    assert!(admin.starts_with("0.0.0.0:"), "admin_listen {admin}");
    assert!(listen.starts_with("0.0.0.0:"), "listen {listen}");

    let exposed: Vec<&str> = args_of(&stage, "EXPOSE")
        .iter()
        .flat_map(|ports| ports.split_whitespace())
        .collect();
    for address in [listen, admin] {
        assert!(
            exposed.contains(&port_of(address)),
            "{address} is not in EXPOSE {exposed:?}"
        );
    }

    let healthcheck = args_of(&stage, "HEALTHCHECK").join(" ");
    let probe = format!("http://127.0.0.1:{}/healthz", port_of(admin));
    assert!(
        healthcheck.contains(&probe),
        "HEALTHCHECK {healthcheck:?} does not probe {probe}"
    );

    let user = args_of(&stage, "USER");
    let user = user.last().expect("a USER instruction");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        !matches!(uid, "0" | "root" | ""),
        "the image runs as {user:?}"
    );
}
