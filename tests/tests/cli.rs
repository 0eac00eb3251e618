//! The command-line contract: binaries, subcommands, env-backed flags, clear errors.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use geossl_tests::{run, text};

#[test]
fn help_lists_the_contracted_subcommands() {
    for (bin, subs) in [
        ("geossl-train", &["pretrain", "probe", "finetune", "segment"][..]),
        ("geossl-export", &["onnx", "import"][..]),
        ("geossl-serve", &["serve", "embed"][..]),
    ] {
        let o = run(bin, &["--help"]);
        assert!(o.status.success(), "{bin} --help failed: {}", text(&o));
        let t = text(&o);
        for s in subs {
            assert!(t.contains(s), "{bin} --help does not list `{s}`:\n{t}");
        }
        for s in subs {
            let o = run(bin, &[s, "--help"]);
            assert!(o.status.success(), "{bin} {s} --help failed: {}", text(&o));
        }
    }
    // Every flag has an environment variable.
    let t = text(&run("geossl-export", &["onnx", "--help"]));
    assert!(t.contains("[env: GEOSSL_CHECKPOINT=]") && t.contains("[env: GEOSSL_OPSET=]"), "{t}");
    let t = text(&run("geossl-serve", &["serve", "--help"]));
    assert!(t.contains("[env: GEOSSL_MODEL_REPOSITORY=]") && t.contains("[env: GEOSSL_PORT=]"), "{t}");
}

#[test]
fn init_then_info_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("r18");
    let ck_s = ck.to_str().unwrap();
    let o = run("geossl-train", &["init", "--arch", "resnet18", "--input-size", "64", "--projection", "--out", ck_s]);
    assert!(o.status.success(), "{}", text(&o));
    let spec: geossl_models::ModelSpec =
        serde_json::from_str(&std::fs::read_to_string(ck.join("spec.json")).unwrap()).unwrap();
    assert_eq!(spec.backbone.arch, geossl_models::Arch::Resnet18);
    assert_eq!(spec.projection_out(), Some(128));
    let o = run("geossl-train", &["info", "--checkpoint", ck_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resnet18") && text(&o).contains("libtorch cuda runtime loaded: true"), "{}", text(&o));

    // Errors are one clear line naming the problem, not a panic or a backtrace.
    let missing = dir.path().join("nope");
    let o = run("geossl-train", &["info", "--checkpoint", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: ") && err.contains("nope") && err.lines().count() == 1, "{err}");
    let o = run("geossl-train", &["init", "--arch", "vgg16", "--out", ck_s]);
    assert!(!o.status.success() && text(&o).contains("vgg16"), "{}", text(&o));
    let o = run("geossl-train", &["init", "--bands", "0", "--out", ck_s]);
    assert!(!o.status.success() && text(&o).contains("in_channels"), "{}", text(&o));
    // The failed inits left the earlier checkpoint intact.
    assert!(run("geossl-train", &["info", "--checkpoint", ck_s]).status.success());

    // train → export: the checkpoint becomes an ONNX file; a head it lacks is a clear error and no file.
    let onnx = dir.path().join("m.onnx");
    let onnx_s = onnx.to_str().unwrap();
    let o = run("geossl-export", &["onnx", "--checkpoint", ck_s, "--out", onnx_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::metadata(&onnx).unwrap().len() > 40_000_000, "ResNet-18 weights are in the file");
    let bad = dir.path().join("c.onnx");
    let o = run("geossl-export", &["onnx", "--checkpoint", ck_s, "--head", "classify", "--out", bad.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("no classifier head"), "{}", text(&o));
    assert!(!bad.exists());

    // The server refuses a missing model repository by name, before binding anything.
    let missing = dir.path().join("no-such-repo");
    let o = run("geossl-serve", &["serve", "--model-repository", missing.to_str().unwrap(), "--port", "0"]);
    assert!(!o.status.success() && text(&o).contains("no-such-repo"), "{}", text(&o));
}

/// Subcommand names in a `--help` text's `Commands:` section (less `help`).
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for l in help.lines() {
        if l.starts_with("Commands:") {
            inside = true;
        } else if inside {
            if !l.starts_with("  ") || l.trim().is_empty() {
                break;
            }
            let name = l.split_whitespace().next().unwrap_or_default();
            if name != "help" {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Each option of a `--help` text: (long flag, its environment variable, its help text). Clap prints an
/// option's signature indented by at most 6 columns, its help on the same or the following lines.
fn options(help: &str) -> Vec<(String, Option<String>, String)> {
    let mut entries: Vec<Vec<&str>> = Vec::new();
    let mut inside = false;
    for l in help.lines() {
        if l.starts_with("Options:") || l.starts_with("Arguments:") {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        let indent = l.len() - l.trim_start().len();
        if l.trim_start().starts_with('-') && indent <= 6 {
            entries.push(vec![l]);
        } else if let Some(e) = entries.last_mut() {
            e.push(l);
        }
    }
    entries
        .into_iter()
        .map(|e| {
            let head = e[0].trim();
            let flag = head.split_whitespace().find(|w| w.starts_with("--")).unwrap_or(head).trim_end_matches(',');
            let flag = flag.split(['=', '<', ' ']).next().unwrap_or(flag).to_string();
            // The help: the head's text after its signature (two spaces), then the following lines.
            let mut text = head.split_once("  ").map(|(_, t)| t.to_string()).unwrap_or_default();
            for l in &e[1..] {
                text.push(' ');
                text.push_str(l.trim());
            }
            let env = text.split("[env: ").nth(1).map(|r| r.split([']', '=']).next().unwrap_or("").to_string());
            let described: String = text.split('[').next().unwrap_or("").trim().to_string();
            (flag, env, described)
        })
        .collect()
}

/// Every environment variable of the three CLIs and the commands (`tool sub`, `tool *` for a global flag)
/// that read it; fails on an option without a variable or without a help line.
fn env_uses() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut uses: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    let mut problems = Vec::new();
    for bin in ["geossl-train", "geossl-export", "geossl-serve"] {
        let tool = bin.trim_start_matches("geossl-");
        let top = text(&run(bin, &["--help"]));
        let global: Vec<String> = options(&top).into_iter().map(|o| o.0).collect();
        let mut todo: Vec<Vec<String>> = vec![Vec::new()];
        while let Some(path) = todo.pop() {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            let o = run(bin, &args);
            assert!(o.status.success(), "{bin} {} failed: {}", args.join(" "), text(&o));
            let help = text(&o);
            for (flag, env, described) in options(&help) {
                if flag == "--help" || flag == "--version" {
                    continue;
                }
                let at = format!("{bin} {} {flag}", path.join(" "));
                if described.is_empty() {
                    problems.push(format!("{at}: no help line"));
                }
                let Some(env) = env else {
                    problems.push(format!("{at}: no environment variable"));
                    continue;
                };
                let who =
                    if global.contains(&flag) { format!("{tool} *") } else { format!("{tool} {}", path.join(" ")) };
                uses.entry(env).or_default().insert(who);
            }
            for s in subcommands(&help) {
                let mut p = path.clone();
                p.push(s);
                todo.push(p);
            }
        }
    }
    assert!(problems.is_empty(), "options without a variable or a help line:\n{}", problems.join("\n"));
    uses
}

/// docs/environment.md's table matches the binaries: the same variables, each used by exactly the commands
/// it lists (so a variable has one row, one type and one meaning), and every option has a help line.
#[test]
fn every_environment_variable_has_one_meaning_and_is_documented() {
    let doc = std::fs::read_to_string(geossl_tests::workspace().join("docs/environment.md")).unwrap();
    let table: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = doc
        .split("\n## ")
        .next()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let var = cells[0].trim_start_matches("| ").trim_matches('`').to_string();
            let used = cells[3].trim_end_matches(" |").split(", ").map(|u| u.trim_matches('`').to_string()).collect();
            (var, used)
        })
        .collect();
    let found = env_uses();
    let only = |a: &std::collections::BTreeMap<String, _>, b: &std::collections::BTreeMap<String, _>| {
        a.keys().filter(|k| !b.contains_key(*k)).cloned().collect::<Vec<String>>()
    };
    assert!(
        only(&found, &table).is_empty(),
        "variables the CLIs read and docs/environment.md lacks: {:?}",
        only(&found, &table)
    );
    assert!(
        only(&table, &found).is_empty(),
        "variables docs/environment.md lists and no CLI reads: {:?}",
        only(&table, &found)
    );
    for (var, used) in &found {
        assert_eq!(used, &table[var], "{var}: the CLIs' uses (left) differ from docs/environment.md's (right)");
    }
}

/// A renamed variable keeps its old meaning with a warning, and only for values of that meaning.
#[test]
fn renamed_variables_still_work_where_they_meant_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let init = |env: &[(&str, &str)], out: &str| {
        let mut c = std::process::Command::new(geossl_tests::bin("geossl-train"));
        c.args(["init", "--arch", "resnet18", "--input-size", "32", "--out"]).arg(dir.path().join(out));
        c.env_remove("GEOSSL_BAND_COUNT").env_remove("GEOSSL_BANDS").envs(env.iter().copied());
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let spec: geossl_models::ModelSpec =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(out).join("spec.json")).unwrap()).unwrap();
        (spec.backbone.in_channels, text(&o))
    };
    let (c, log) = init(&[("GEOSSL_BANDS", "4")], "four");
    assert_eq!(c, 4);
    assert!(log.contains("GEOSSL_BANDS is deprecated") && log.contains("GEOSSL_BAND_COUNT"), "{log}");
    // Band names are GEOSSL_BANDS's meaning now (the embedder's): the trainer leaves them alone.
    let (c, log) = init(&[("GEOSSL_BANDS", "B04,B03,B02")], "names");
    assert_eq!(c, 3);
    assert!(!log.contains("deprecated"), "{log}");
    let (c, log) = init(&[("GEOSSL_BAND_COUNT", "5"), ("GEOSSL_BANDS", "4")], "new");
    assert_eq!(c, 5, "the new name wins");
    assert!(!log.contains("deprecated"), "{log}");

    // geossl-export onnx: GEOSSL_INPUT=float32 is the input type as before; a file list is not.
    let ck = dir.path().join("four");
    let export = |env: &[(&str, &str)], out: &str| {
        let mut c = std::process::Command::new(geossl_tests::bin("geossl-export"));
        c.args(["onnx", "--checkpoint"]).arg(&ck).arg("--out").arg(dir.path().join(out));
        c.env_remove("GEOSSL_INPUT_TYPE").env_remove("GEOSSL_INPUT").envs(env.iter().copied());
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let script = "import onnx, sys; print(onnx.load(sys.argv[1]).graph.input[0].type.tensor_type.elem_type)";
        let t = std::process::Command::new(geossl_tests::python())
            .args(["-c", script])
            .arg(dir.path().join(out))
            .output()
            .unwrap();
        assert!(t.status.success(), "{}", text(&t));
        (String::from_utf8_lossy(&t.stdout).trim().to_string(), text(&o))
    };
    let (ty, log) = export(&[("GEOSSL_INPUT", "float32")], "f.onnx");
    assert_eq!(ty, "1", "FLOAT input");
    assert!(log.contains("GEOSSL_INPUT is deprecated") && log.contains("GEOSSL_INPUT_TYPE"), "{log}");
    let (ty, log) = export(&[("GEOSSL_INPUT", "s3://bucket/scenes/")], "u.onnx");
    assert_eq!(ty, "2", "the default, UINT8");
    assert!(!log.contains("deprecated"), "{log}");
}
