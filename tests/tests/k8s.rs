#![allow(clippy::unwrap_used)]
//! The Kubernetes manifests stay in step with the server: every `GEOSSL_*`
//! variable they set is a flag of `geossl-serve serve`, and every probe path
//! is a route of the server's OpenAPI document.

use geossl_tests::{run, text, workspace};

fn manifests() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for dir in [workspace().join("k8s"), workspace().join("k8s/cpu")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                out.push((p.display().to_string(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out
}

#[test]
fn env_vars_are_serve_flags_and_probes_are_routes() {
    let help = run("geossl-serve", &["serve", "--help"]);
    assert!(help.status.success(), "{}", text(&help));
    let help = text(&help);
    let openapi: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("serve/openapi.json")).unwrap()).unwrap();
    let mut vars = 0;
    let mut probes = 0;
    for (path, yaml) in manifests() {
        for word in yaml.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("GEOSSL_") {
                assert!(help.contains(&format!("env: {word}")), "{path}: {word} is not a `geossl-serve serve` flag");
                vars += 1;
            }
        }
        for line in yaml.lines() {
            if let Some(rest) = line.split("path: ").nth(1) {
                let p = rest.split([',', '}', ' ']).next().unwrap();
                if p.starts_with("/v2") {
                    assert!(openapi["paths"].get(p).is_some(), "{path}: probe {p} is not a server route");
                    probes += 1;
                }
            }
        }
    }
    assert!(vars >= 10, "only {vars} GEOSSL_ variables found");
    assert!(probes >= 3, "only {probes} probes found");
}
