#![allow(clippy::unwrap_used)]
//! The Kubernetes manifests render and validate: every kustomization under
//! `k8s/` renders with `kubectl kustomize`, and its output validates strictly
//! (unknown fields rejected) against the schemas of a pinned Kubernetes version
//! with `kubernetes-validate` from the project venv. The rendered deployments
//! stay in step with the server (every `GEOSSL_*` variable is a flag of
//! `geossl-serve serve`, every probe path a route of its OpenAPI document), and
//! the README's `kubectl apply -k` paths are among the rendered ones.

use std::path::{Path, PathBuf};
use std::process::Command;

use geossl_tests::{python, run, text, workspace};
use serde_json::Value;

/// The Kubernetes version whose schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.32.0";
/// Custom resources that kubernetes-validate has no schema for (their CRDs come
/// with the operator that owns them).
const CUSTOM_KINDS: &[&str] = &["ServiceMonitor"];

/// Every directory under `k8s/` with a `kustomization.yaml`, and whether it is a
/// Component (rendered only through a kustomization that uses it).
fn kustomizations() -> Vec<(PathBuf, bool)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, bool)>) {
        let k = dir.join("kustomization.yaml");
        if k.exists() {
            let component = std::fs::read_to_string(&k).unwrap().lines().any(|l| l.trim() == "kind: Component");
            out.push((dir.to_path_buf(), component));
        }
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries.into_iter().filter(|p| p.is_dir()) {
            walk(&p, out);
        }
    }
    let mut out = Vec::new();
    walk(&workspace().join("k8s"), &mut out);
    out
}

fn rel(dir: &Path) -> String {
    dir.strip_prefix(workspace()).unwrap().display().to_string()
}

/// `kubectl kustomize dir`: the rendered YAML stream.
fn render(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", &dir.display().to_string()])
        .output()
        .unwrap_or_else(|e| panic!("kubectl (with kustomize) is needed to render k8s/: {e}"));
    assert!(out.status.success(), "kubectl kustomize {} failed:\n{}", rel(dir), text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Validates a rendered stream strictly; returns the objects as JSON.
fn validate(name: &str, yaml: &str, scratch: &Path) -> Vec<Value> {
    let file = scratch.join(format!("{}.yaml", name.replace('/', "_")));
    std::fs::write(&file, yaml).unwrap();
    let validator = python().with_file_name("kubernetes-validate");
    let out = Command::new(&validator)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION, &file.display().to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", validator.display()));
    let report = text(&out);
    assert!(out.status.success(), "{name}: kubernetes-validate --strict -k {KUBERNETES_VERSION} failed:\n{report}");
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let known = CUSTOM_KINDS.iter().any(|k| line.contains(&format!("Couldn't find schema for kind {k} ")));
        assert!(known, "{name}: kubernetes-validate: {line}");
    }
    let script = "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))";
    let out = Command::new(python()).args(["-c", script]).stdin(std::fs::File::open(&file).unwrap()).output().unwrap();
    assert!(out.status.success(), "{name}: YAML → JSON: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every kustomization rendered and validated, by path relative to the workspace.
fn rendered() -> Vec<(String, Vec<Value>)> {
    let scratch = tempfile::tempdir().unwrap();
    kustomizations()
        .into_iter()
        .filter(|(_, component)| !component)
        .map(|(dir, _)| {
            let name = rel(&dir);
            let objects = validate(&name, &render(&dir), scratch.path());
            assert!(!objects.is_empty(), "{name} renders nothing");
            (name, objects)
        })
        .collect()
}

fn deployment<'a>(name: &str, objects: &'a [Value]) -> &'a Value {
    let d: Vec<_> = objects.iter().filter(|o| o["kind"] == "Deployment").collect();
    assert_eq!(d.len(), 1, "{name}: one Deployment expected");
    d[0]
}

/// `name → value` of a container's env.
fn container_env(c: &Value) -> Vec<(String, Value)> {
    c["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].clone())).collect()
}

/// `name → value` of the serve container's env.
fn env(name: &str, objects: &[Value]) -> Vec<(String, Value)> {
    container_env(&deployment(name, objects)["spec"]["template"]["spec"]["containers"][0])
}

/// Every container and init container of the Deployments and Jobs.
fn containers(objects: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for o in objects.iter().filter(|o| o["kind"] == "Deployment" || o["kind"] == "Job") {
        for key in ["initContainers", "containers"] {
            out.extend(o["spec"]["template"]["spec"][key].as_array().cloned().unwrap_or_default());
        }
    }
    out
}

/// Whether these objects are the serving deployment (else the archive-embedding Job).
fn serving(objects: &[Value]) -> bool {
    objects.iter().any(|o| o["kind"] == "Deployment")
}

#[test]
fn every_kustomization_renders_and_validates_strictly() {
    let all = kustomizations();
    let rendered = rendered();
    assert!(rendered.len() >= 3, "only {} kustomizations found", rendered.len());
    // A component is checked through the kustomizations that use it.
    for (dir, _) in all.iter().filter(|(_, c)| *c) {
        let name = dir.file_name().unwrap().to_str().unwrap();
        let used = all.iter().any(|(d, c)| {
            !c && std::fs::read_to_string(d.join("kustomization.yaml")).unwrap().contains(&format!("components/{name}"))
        });
        assert!(used, "component {} is used by no kustomization, so nothing renders it", rel(dir));
    }
    for (name, objects) in &rendered {
        for o in objects {
            let kind = o["kind"].as_str().unwrap();
            if kind != "Namespace" {
                assert_eq!(
                    o["metadata"]["namespace"], "geossl",
                    "{name}: {kind} {} outside the namespace",
                    o["metadata"]["name"]
                );
            }
        }
        for c in containers(objects) {
            let vars = container_env(&c);
            let mut names: Vec<_> = vars.iter().map(|(n, _)| n.clone()).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), vars.len(), "{name}: an env variable is set twice in {}", c["name"]);
        }
    }
    let by_name = |n: &str| &rendered.iter().find(|(p, _)| p == n).unwrap_or_else(|| panic!("{n} not found")).1;
    for (overlay, provider, gpus) in [("k8s/overlays/gpu", "cuda", Some(1)), ("k8s/overlays/cpu", "cpu", None)] {
        let objects = by_name(overlay);
        let ep = env(overlay, objects).into_iter().find(|(n, _)| n == "GEOSSL_EXECUTION_PROVIDER").unwrap().1;
        assert_eq!(ep, provider, "{overlay}: execution provider");
        let limits = &deployment(overlay, objects)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"];
        assert_eq!(limits["nvidia.com/gpu"].as_i64(), gpus, "{overlay}: GPU limit");
        assert!(limits["memory"].is_string(), "{overlay}: the base's memory limit was lost");
    }
    assert!(by_name("k8s/overlays/gpu-prometheus").iter().any(|o| o["kind"] == "ServiceMonitor"));
}

/// Every container of every rendered kustomization runs an image `scripts/images.sh` builds (same name and
/// tag: the workspace version), so what CI builds and checks is what the manifests deploy.
#[test]
fn manifests_run_the_images_the_build_makes() {
    let o =
        std::process::Command::new("bash").arg(workspace().join("scripts/images.sh")).arg("names").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let built: Vec<String> = String::from_utf8(o.stdout).unwrap().split_whitespace().map(str::to_string).collect();
    assert_eq!(
        built,
        [format!("geossl/serve:{}", env!("CARGO_PKG_VERSION")), format!("geossl/train:{}", env!("CARGO_PKG_VERSION"))]
    );
    let mut used = std::collections::BTreeSet::new();
    for (name, objects) in rendered() {
        for c in containers(&objects) {
            let image = c["image"].as_str().unwrap().to_string();
            assert!(
                built.contains(&image),
                "{name}: container {} runs {image}, which scripts/images.sh does not build",
                c["name"]
            );
            used.insert(image);
        }
    }
    assert_eq!(used.len(), 2, "both images are deployed somewhere: {used:?}");
}

#[test]
fn readme_deploy_commands_are_rendered_kustomizations() {
    let ks: Vec<String> = kustomizations().into_iter().filter(|(_, c)| !c).map(|(d, _)| rel(&d)).collect();
    let mut found = 0;
    for doc in ["README.md", "k8s/README.md"] {
        let s = std::fs::read_to_string(workspace().join(doc)).unwrap();
        for rest in s.split("kubectl apply -k ").skip(1) {
            let path = rest.split(|c: char| c.is_whitespace() || c == '`').next().unwrap().trim_end_matches('/');
            assert!(ks.iter().any(|k| k == path), "{doc}: `kubectl apply -k {path}` is not a kustomization under k8s/");
            found += 1;
        }
    }
    assert!(found >= 2, "the READMEs name {found} deploy commands");
}

#[test]
fn env_vars_are_serve_flags_and_probes_are_routes() {
    let help = run("geossl-serve", &["serve", "--help"]);
    assert!(help.status.success(), "{}", text(&help));
    let help = text(&help);
    let openapi: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("serve/openapi.json")).unwrap()).unwrap();
    for (name, objects) in rendered().into_iter().filter(|(_, o)| serving(o)) {
        let vars = env(&name, &objects);
        for (var, _) in &vars {
            assert!(help.contains(&format!("env: {var}")), "{name}: {var} is not a `geossl-serve serve` flag");
        }
        assert!(vars.len() >= 10, "{name}: only {} GEOSSL_ variables", vars.len());
        let c = &deployment(&name, &objects)["spec"]["template"]["spec"]["containers"][0];
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let p = c[probe]["httpGet"]["path"].as_str().unwrap_or_else(|| panic!("{name}: no {probe}"));
            assert!(openapi["paths"].get(p).is_some(), "{name}: {probe} {p} is not a server route");
        }
    }
}

/// The archive-embedding Indexed Job as rendered (CPU overlay) runs here against a local S3-compatible server
/// (moto on 127.0.0.1): each index's plan init container and embed container, with their args and env from the
/// manifest and the credentials Secret's variables set as the Secret would, then `embed verify` passes on the
/// dataset in the bucket; every GEOSSL_ variable of the Job is a flag of the command its container runs. Then
/// k8s/search's index Job indexes that dataset and its Deployment's server serves the index from the bucket.
#[test]
fn the_rendered_embedding_and_index_jobs_run_and_the_search_deployment_serves() {
    let scratch = tempfile::tempdir().unwrap();
    let objects =
        validate("k8s/embed/overlays/cpu", &render(&workspace().join("k8s/embed/overlays/cpu")), scratch.path());
    let job = objects.iter().find(|o| o["kind"] == "Job").expect("a Job");
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    let completions = job["spec"]["completions"].as_u64().unwrap();
    let pod = &job["spec"]["template"]["spec"];
    let (init, main) = (&pod["initContainers"][0], &pod["containers"][0]);
    let args = |c: &Value| -> Vec<String> {
        c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
    };
    // Every GEOSSL_ variable is a flag of the command its container runs.
    for c in [init, main] {
        let mut help_args = args(c);
        help_args.push("--help".into());
        let help = text(&run("geossl-serve", &help_args.iter().map(String::as_str).collect::<Vec<_>>()));
        for (var, _) in container_env(c) {
            assert!(
                help.contains(&format!("env: {var}")),
                "{}: {var} is not a flag of geossl-serve {:?}",
                c["name"],
                args(c)
            );
        }
    }
    let shard_count = container_env(main).into_iter().find(|(n, _)| n == "GEOSSL_SHARD_COUNT").unwrap().1;
    assert_eq!(shard_count.as_str().unwrap().parse::<u64>().unwrap(), completions, "shard count vs completions");
    // Both containers take the archive's credentials from the Secret; here they come from the local server.
    for c in [init, main] {
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], "geossl-archive-credentials", "{}", c["name"]);
    }
    let plain = |c: &Value, var: &str| {
        container_env(c).into_iter().find(|(n, _)| n == var).unwrap().1.as_str().unwrap().to_owned()
    };
    let bucket = plain(init, "GEOSSL_PLAN_INPUT");
    let bucket = bucket.strip_prefix("s3://").and_then(|b| b.split('/').next()).expect("an s3:// archive").to_owned();
    let moto = geossl_tests::objstore::Moto::start();
    moto.bucket(&bucket);
    let scene = std::fs::read(geossl_tests::data::fixtures().join("rasterio/RGB.byte.tif")).unwrap();
    for i in 0..4 {
        moto.put(&bucket, &format!("scenes/s{i}.tif"), &scene);
    }
    let root = scratch.path();
    geossl_tests::server::make_repository(&root.join("models"), 64, &[("embed", "embed", &[])]);
    let local = |v: &str| v.replace("/models", &root.join("models").display().to_string());
    let secret = geossl_tests::objstore::Moto::env(moto.addr);
    let run_container = |c: &Value, index: u64| {
        let mut cmd = Command::new(geossl_tests::bin("geossl-serve"));
        cmd.args(args(c)).env("JOB_COMPLETION_INDEX", index.to_string());
        for (k, v) in container_env(c) {
            cmd.env(k, local(v.as_str().unwrap()));
        }
        cmd.envs(secret.iter().map(|(k, v)| (*k, v.as_str())));
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{} of index {index}: {}", c["name"], text(&o));
    };
    for index in 0..completions {
        run_container(init, index);
        run_container(main, index);
    }
    let (plan, dataset) = (plain(main, "GEOSSL_PLAN"), plain(main, "GEOSSL_OUT"));
    let o = Command::new(geossl_tests::bin("geossl-serve"))
        .args(["embed", "verify", "--plan", &plan, "--dataset", &dataset])
        .envs(secret.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(o.status.success() && text(&o).contains(&format!("{completions} shards complete")), "{}", text(&o));
    let rows: usize =
        text(&o).split(" rows").next().and_then(|s| s.rsplit(' ').next()).and_then(|n| n.parse().ok()).unwrap();

    // k8s/search: its Job indexes that dataset, and its Deployment's server (the container's env, on local
    // ports) serves the index from the bucket.
    let search = validate("k8s/search", &render(&workspace().join("k8s/search")), scratch.path());
    let job = search.iter().find(|o| o["kind"] == "Job").expect("the index Job");
    let indexer = &job["spec"]["template"]["spec"]["containers"][0];
    let mut help_args = args(indexer);
    help_args.push("--help".into());
    let help = text(&run("geossl-serve", &help_args.iter().map(String::as_str).collect::<Vec<_>>()));
    for (var, _) in container_env(indexer) {
        assert!(help.contains(&format!("env: {var}")), "{var} is not a flag of geossl-serve {:?}", args(indexer));
    }
    assert_eq!(plain(indexer, "GEOSSL_DATASET"), dataset, "the index Job reads what the embedding Job writes");
    run_container(indexer, 0);
    let server = deployment("k8s/search", &search)["spec"]["template"]["spec"]["containers"][0].clone();
    let served = plain(&server, "GEOSSL_INDEXES");
    assert_eq!(
        served.split_once('=').unwrap().1,
        plain(indexer, "GEOSSL_INDEX_OUT"),
        "the Deployment serves the Job's index"
    );
    let mut env: Vec<(&str, String)> = secret.clone();
    for (k, v) in container_env(&server) {
        let v = match k.as_str() {
            "GEOSSL_HOST" => "127.0.0.1".to_string(),
            "GEOSSL_PORT" | "GEOSSL_METRICS_PORT" => "0".to_string(),
            _ => local(v.as_str().unwrap_or_default()),
        };
        if v.is_empty() {
            continue; // from a Secret (the API key)
        }
        env.push((Box::leak(k.into_boxed_str()), v));
    }
    let s = geossl_tests::server::Server::spawn_env(&args(&server), None, root.join("search.log"), &env);
    let listed = geossl_tests::http::get(s.addr, "/v1/indexes").json();
    assert_eq!(listed["indexes"][0]["rows"].as_u64(), Some(rows as u64), "{listed}");
    let name = listed["indexes"][0]["name"].as_str().unwrap().to_string();
    let body = serde_json::json!({"embedding": vec![1.0; listed["indexes"][0]["dimensions"].as_u64().unwrap() as usize], "k": 3});
    let r = geossl_tests::http::post(
        s.addr,
        &format!("/v1/indexes/{name}/search"),
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["features"].as_array().unwrap().len(), 3);
}
