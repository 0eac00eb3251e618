//! The README's serve example, run as written from a fresh clone's root after the quickstart: the model
//! repository path it names, the server started with its flags (on free ports), and its `curl` request
//! sent as an HTTP request with the same method, header and body.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use geossl_tests::server::Server;
use geossl_tests::{run, text, workspace};

/// The shell commands of the README's fenced block after `marker`: comments dropped, `\`-continued lines
/// joined, each split into words (single quotes kept together).
fn readme_commands(marker: &str) -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let after = readme.split(marker).nth(1).unwrap_or_else(|| panic!("README.md has no {marker:?}"));
    let block = after.split("```bash\n").nth(1).unwrap().split("```").next().unwrap();
    let joined = block.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = Vec::new();
            let mut quoted = l.split('\'');
            for (i, part) in quoted.by_ref().enumerate() {
                if i % 2 == 1 {
                    words.push(part.to_string());
                } else {
                    words.extend(part.split_whitespace().map(str::to_string));
                }
            }
            words
        })
        .collect()
}

/// A fresh clone's root: every top-level entry of this checkout linked into a new directory (so a path the
/// README writes to that collides with a crate of the repository shows), with its own `runs/` and `data/`.
fn clone_root(dir: &Path) {
    for e in std::fs::read_dir(workspace()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if ["runs", "data", ".git"].iter().any(|n| name == *n) {
            continue;
        }
        std::os::unix::fs::symlink(e.path(), dir.join(&name)).unwrap();
    }
}

#[test]
fn the_readme_serve_example_works_as_written() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    clone_root(root);
    // What `make quickstart` leaves: a ResNet-18 64 px checkpoint and its model repository.
    let ck = root.join("runs/quickstart/checkpoint");
    let o = run("geossl-train", &["init", "--arch", "resnet18", "--input-size", "64", "--out", ck.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let onnx = root.join("runs/quickstart/models/embed/1/model.onnx");
    let o = run("geossl-export", &["onnx", "--checkpoint", ck.to_str().unwrap(), "--out", onnx.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));

    let cmds = readme_commands("<!-- tests/tests/readme.rs runs this block");
    assert_eq!(cmds.len(), 2, "a server and a request: {cmds:?}");
    // The server, as written but on free ports of the loopback interface.
    let serve = &cmds[0];
    assert_eq!(serve[0], "target/release/geossl-serve", "the README uses the release binaries");
    assert_eq!(serve.last().map(String::as_str), Some("&"));
    let mut args: Vec<String> = serve[1..serve.len() - 1].to_vec();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--port" || args[i] == "--metrics-port" {
            args[i + 1] = "0".into();
        }
        i += 1;
    }
    args.extend(["--host".into(), "127.0.0.1".into()]);
    let server = Server::spawn(&args, Some(root), root.join("serve.log"));

    // The request: curl -X METHOD -H 'Header: value' --data-binary @FILE URL.
    let curl = &cmds[1];
    assert_eq!(curl[0], "curl");
    let flag = |f: &str| curl.iter().position(|w| w == f).map(|i| curl[i + 1].clone()).unwrap();
    assert_eq!(flag("-X"), "POST");
    let (hk, hv) = flag("-H").split_once(": ").map(|(k, v)| (k.to_string(), v.to_string())).unwrap();
    let body = std::fs::read(root.join(flag("--data-binary").trim_start_matches('@'))).unwrap();
    let url = curl.last().unwrap();
    let path = &url[url.find('/').unwrap()..];
    let r = geossl_tests::http::post(server.addr, path, &[(hk.as_str(), hv.as_str())], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["dim"], 512, "{j}");
    assert_eq!(j["embeddings"][0].as_array().unwrap().len(), 512);
}
