//! The deployment files under `deploy/` checked with the tools that understand them: yamllint and
//! kubernetes-validate for the Kubernetes manifests, systemd for the unit, buildah and podman for
//! the container image's runtime layout. Those tests need outside tools (`.ci/run` installs them)
//! and are ignored by a plain `cargo test`; the checks that need only Rust run always.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Kubernetes version the manifests are validated against (native sidecars are GA in 1.33).
const KUBERNETES_VERSION: &str = "1.33.0";

/// Highest `systemd-analyze security` exposure accepted for the unit (the tool's scale is 0-10).
const MAX_EXPOSURE: f64 = 2.0;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Runs a tool; a tool that is missing fails the test loudly rather than skipping it.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{program} could not be started ({e}); .ci/run installs it"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every Kubernetes manifest (the kustomization is kustomize's, not an API object).
fn manifests() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|entry| {
            entry
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .map(|name| format!("deploy/kubernetes/{name}"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected the sidecar and shared-service manifests, found {files:?}"
    );
    files
}

/// The `- item` lines of a top-level YAML list such as `resources:`.
fn yaml_list(yaml: &str, key: &str) -> Vec<String> {
    yaml.lines()
        .skip_while(|line| *line != format!("{key}:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.trim().strip_prefix("- "))
        .map(str::to_owned)
        .collect()
}

/// The `args:` of every container in a manifest, one list per container.
fn container_args(yaml: &str) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "args:" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut args = Vec::new();
        while let Some(next) = lines.peek() {
            let trimmed = next.trim_start();
            if next.len() - trimmed.len() < indent
                || !(trimmed.starts_with('-') || trimmed.starts_with('#'))
            {
                break;
            }
            if let Some(arg) = trimmed.strip_prefix("- ") {
                args.push(arg.trim_matches('"').to_owned());
            }
            lines.next();
        }
        all.push(args);
    }
    all
}

#[test]
fn kustomization_lists_the_sidecar_and_the_shared_service() {
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    let resources = yaml_list(&kustomization, "resources");
    assert_eq!(resources, ["sidecar.yaml", "shared-service.yaml"]);
    for resource in &resources {
        assert!(
            repo(&format!("deploy/kubernetes/{resource}")).is_file(),
            "{resource} is missing"
        );
    }
    // The PKCS#12 sidecar is the documented alternative to sidecar.yaml, not an extra Deployment.
    let listed: Vec<String> = resources
        .iter()
        .map(|r| format!("deploy/kubernetes/{r}"))
        .collect();
    for manifest in manifests() {
        assert!(
            listed.contains(&manifest) || manifest.ends_with("sidecar-pkcs12.yaml"),
            "{manifest} is in no kustomization"
        );
    }
}

#[test]
fn every_flag_in_the_manifests_and_the_unit_is_one_the_binary_accepts() {
    let mut sets: Vec<(String, Vec<String>)> = Vec::new();
    for manifest in manifests() {
        let lists = container_args(&read(&manifest));
        assert!(!lists.is_empty(), "{manifest} has no args");
        // The example application's container has no args; every list here is vero-proxy's.
        sets.extend(lists.into_iter().map(|args| (manifest.clone(), args)));
    }
    let unit = read("deploy/systemd/vero-proxy.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    // The unit's config file is the shipped example, installed as /etc/vero-proxy/vero-proxy.toml.
    let example = repo("vero-proxy.example.toml").display().to_string();
    let unit_args: Vec<String> = exec
        .split_whitespace()
        .skip(2)
        .map(|a| a.replace("/etc/vero-proxy/vero-proxy.toml", &example))
        .collect();
    sets.push(("vero-proxy.service".into(), unit_args));

    for (origin, args) in sets {
        // `check` parses and validates exactly what `run` does, then fails on the identity files,
        // which do not exist here: only the configuration's verdict matters.
        let output = Command::new(env!("CARGO_BIN_EXE_vero-proxy"))
            .arg("check")
            .args(&args)
            .output()
            .expect("run vero-proxy check");
        let said = text(&output);
        assert!(
            said.lines()
                .any(|l| l.starts_with("ok") && l.contains("configuration:")),
            "{origin}: vero-proxy refuses {args:?}:\n{said}"
        );
    }
}

#[test]
fn dockerfile_runs_as_65532_and_documents_both_ports() {
    let dockerfile = read("deploy/Dockerfile");
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    assert!(
        runtime.starts_with("gcr.io/distroless/cc"),
        "runtime stage: {runtime}"
    );
    assert!(runtime.contains("\nUSER 65532:65532\n"));
    assert!(runtime.contains("\nEXPOSE 8080 9901\n"));
    assert!(runtime.contains("\nENTRYPOINT [\"/usr/local/bin/vero-proxy\"]"));
    assert!(dockerfile.contains("FROM docker.io/library/rust:"));
    let dockerignore = read(".dockerignore");
    assert!(dockerignore
        .lines()
        .any(|l| l.trim_matches('/') == "target"));
}

#[test]
#[ignore = "needs yamllint (pip)"]
fn deploy_yaml_passes_yamllint() {
    let output = run(
        "yamllint",
        &["--strict", "-c", "deploy/yamllint.yaml", "deploy/"],
    );
    assert!(output.status.success(), "yamllint:\n{}", text(&output));
}

#[test]
#[ignore = "needs kubernetes-validate (pip)"]
fn manifests_validate_against_the_pinned_kubernetes_schemas() {
    let files = manifests();
    let mut args = vec!["--strict", "-k", KUBERNETES_VERSION];
    args.extend(files.iter().map(String::as_str));
    let output = run("kubernetes-validate", &args);
    let said = text(&output);
    println!("{said}");
    assert!(output.status.success(), "kubernetes-validate:\n{said}");
    // A kind without a schema is only a warning to the tool: treat it as a failure.
    assert!(!said.contains("WARN") && !said.contains("ERROR"), "{said}");
    // Deployment x3, Service, NetworkPolicy, PodDisruptionBudget.
    assert_eq!(said.matches(" passed for resource ").count(), 6, "{said}");
}

/// Puts the binary where the unit's ExecStart expects it: `systemd-analyze verify` checks that
/// the executable exists. The test binary is a debug build; for verify that is the same.
fn install_binary_at_exec_start() -> &'static str {
    static INSTALLED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let unit = read("deploy/systemd/vero-proxy.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart=");
        let path = exec
            .split_whitespace()
            .next()
            .expect("a program")
            .to_owned();
        let tmp = format!("{path}.tmp-{}", std::process::id());
        std::fs::copy(env!("CARGO_BIN_EXE_vero-proxy"), &tmp)
            .unwrap_or_else(|e| panic!("copying the binary to {tmp} (needs root): {e}"));
        std::fs::rename(&tmp, &path).expect("rename into place");
        path
    })
}

#[test]
#[ignore = "needs systemd-analyze and root"]
fn systemd_unit_verifies_without_a_warning() {
    install_binary_at_exec_start();
    let output = run(
        "systemd-analyze",
        &["verify", "deploy/systemd/vero-proxy.service"],
    );
    let said = text(&output);
    assert!(output.status.success(), "systemd-analyze verify:\n{said}");
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warned:\n{said}"
    );
}

#[test]
#[ignore = "needs systemd-analyze and root"]
fn systemd_unit_exposure_is_at_most_2_0() {
    install_binary_at_exec_start();
    let output = run(
        "systemd-analyze",
        &[
            "security",
            "--offline=true",
            "--threshold=20",
            "deploy/systemd/vero-proxy.service",
        ],
    );
    let said = text(&output);
    let score: f64 = said
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for vero-proxy.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{said}"));
    println!("systemd-analyze security --offline=true: exposure {score}");
    assert!(output.status.success(), "over --threshold=20:\n{said}");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{said}"
    );
}

#[test]
#[ignore = "needs systemd-sysusers and systemd-tmpfiles"]
fn sysusers_and_tmpfiles_make_the_user_and_a_config_dir_only_it_can_read() {
    let root = tempfile::tempdir().expect("tempdir");
    for (from, to) in [
        (
            "deploy/systemd/sysusers.d/vero-proxy.conf",
            "etc/sysusers.d/vero-proxy.conf",
        ),
        (
            "deploy/systemd/tmpfiles.d/vero-proxy.conf",
            "etc/tmpfiles.d/vero-proxy.conf",
        ),
    ] {
        let to = root.path().join(to);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(repo(from), to).expect("copy");
    }
    let root_arg = format!("--root={}", root.path().display());
    for tool in [
        vec!["systemd-sysusers", &root_arg],
        vec!["systemd-tmpfiles", &root_arg, "--create"],
    ] {
        let output = run(tool[0], &tool[1..]);
        assert!(output.status.success(), "{}:\n{}", tool[0], text(&output));
    }

    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    let user = passwd
        .lines()
        .find(|l| l.starts_with("vero-proxy:"))
        .expect("the vero-proxy user");
    let fields: Vec<&str> = user.split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(uid > 0 && uid < 1000, "not a system user: {user}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{user}");

    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::metadata(root.path().join("etc/vero-proxy")).expect("/etc/vero-proxy");
    assert_eq!(dir.mode() & 0o7777, 0o750);
    assert_eq!(dir.uid(), 0);
    assert_eq!(dir.gid(), fields[3].parse::<u32>().expect("gid"));
}

#[test]
#[ignore = "needs root, buildah, podman, runc and openssl"]
fn container_image_runs_read_only_as_65532_and_forwards_over_mtls() {
    let output = run(
        "bash",
        &["deploy/image-smoke.sh", env!("CARGO_BIN_EXE_vero-proxy")],
    );
    let said = text(&output);
    println!("{said}");
    assert!(output.status.success(), "deploy/image-smoke.sh:\n{said}");
    assert!(said.contains("image-smoke: ok"), "{said}");
}
