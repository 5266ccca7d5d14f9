//! Kubernetes' path end to end: a client of the CRI API, as the kubelet is, drives containerd
//! 1.6's CRI plugin configured with `snapshotter = "shoal"` and `disable_snapshot_annotations =
//! false` (as `examples/containerd/config-1.x.toml`). In the kubelet's order it runs a
//! host-network pod (no CNI) whose sandbox image is a locally built pause image, pulls an
//! eStargz image, and starts a container that prints a line from the image's big layer into its
//! CRI log while most of that layer is still in the registry: the CRI's pull gave the
//! snapshotter the labels that make its layers FUSE mounts. Removing the container and the pod,
//! as the kubelet does, leaves no mount or shim behind.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PullImageRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use shoal_integration::containerd::{Options, mounts_under, shoal_proxy_config};
use shoal_integration::shoal::{Node, NodeOptions};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, hosts_dir, http, random_bytes};
use tonic::transport::Channel;

const NEEDS: &[&str] = &["docker-registry", "skopeo", "containerd", "runc", "ctr"];

/// The namespace the CRI plugin keeps Kubernetes' images and containers in.
const K8S_NAMESPACE: &str = "k8s.io";

/// What the container prints, read from the small file of the big lazy layer.
const LINE: &str = "hello from a lazy layer through the CRI";

const BIG_LAYER: usize = 48 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_starts_on_a_lazily_pulled_image() -> Result<()> {
    if let Some(why) = caps::missing(NEEDS).or_else(caps::missing_fuse) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().canonicalize()?;
    let registry = Registry::start(&dir.join("registry"))?;
    let pause = pause_image(&dir, &registry)?;
    let (image, big_layer) = lazy_image(&dir, &registry)?;

    // 16 Mbit/s into the node: the 48 MiB layer needs about half a minute to arrive whole.
    let node = Node::start(
        &dir,
        "node",
        &NodeOptions {
            insecure: vec![registry.addr()],
            extra: "ingress_mbit = 16\n".into(),
            ..NodeOptions::default()
        },
    )?;
    let certs = hosts_dir(&dir.join("certs.d"), &registry.addr(), &node.mirror_url())?;
    let mut containerd = Containerd::start_with(
        &dir.join("containerd"),
        Options {
            extra_config: format!(
                "{}\n{}",
                shoal_proxy_config(&node.socket),
                cri_config(&dir, &pause, &certs)
            ),
            namespace: K8S_NAMESPACE.into(),
            ..Options::default()
        },
    )?;
    let channel = containerd_client::connect(containerd.address()).await?;
    let mut images = ImageServiceClient::new(channel.clone());
    let mut runtime = RuntimeServiceClient::new(channel);

    let logs = dir.join("pods/lazy");
    std::fs::create_dir_all(logs.join("app"))?;
    let sandbox = sandbox_config(&logs);

    let result = async {
        // The kubelet's order: the pod first (containerd pulls the pause image itself, a plain
        // image that is unpacked, not mounted), then the containers' images.
        let pod = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: String::new(),
            })
            .await
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        ensure!(
            fuse_mounts(&node.root)? == 0,
            "the pause image is not eStargz and should have been unpacked"
        );
        let pulled = images
            .pull_image(PullImageRequest {
                image: Some(image_spec(&image)),
                auth: None,
                sandbox_config: Some(sandbox.clone()),
            })
            .await
            .context("PullImage")?
            .into_inner()
            .image_ref;
        ensure!(
            fuse_mounts(&node.root)? == 2,
            "the CRI's pull should leave both layers of {image} FUSE-mounted (lazy); mounts: {:?}",
            mounts_under(&node.root)
        );
        let container = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: Some(image_spec(&pulled)),
                    command: vec!["/bin/sh".into(), "-c".into(), "cat /data/small".into()],
                    log_path: "app/0.log".into(),
                    ..ContainerConfig::default()
                }),
                sandbox_config: Some(sandbox.clone()),
            })
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        runtime
            .start_container(StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .context("StartContainer")?;
        let exit_code = wait_for_exit(&mut runtime, &container).await?;
        // Both counts: the registry's log has only finished requests, the node's metric also
        // the pieces of requests still under way.
        let served = registry.blob_bytes_served(&big_layer)?;
        let fetched = node.metric("shoal_swarm_bytes_from_upstream_total")?;

        let log = std::fs::read_to_string(logs.join("app/0.log")).context("the container log")?;
        ensure!(exit_code == 0, "the container exited {exit_code}: {log}");
        let printed: Vec<&str> = log.lines().filter_map(stdout_line).collect();
        ensure!(printed == [LINE], "the container logged {log:?}");
        eprintln!(
            "the container printed after the registry served {served} of the big layer's \
             {BIG_LAYER} bytes (the node fetched {fetched} bytes of all images)"
        );
        ensure!(
            served < BIG_LAYER as u64 / 2,
            "the container printed after the registry served {served} of the big layer's \
             {BIG_LAYER} bytes: not lazy"
        );
        ensure!(
            fetched < BIG_LAYER as f64 / 2.0,
            "the container printed after the node fetched {fetched} bytes from the registry: \
             not lazy"
        );

        // Tear down as the kubelet does when the pod is deleted.
        runtime
            .stop_container(StopContainerRequest {
                container_id: container.clone(),
                timeout: 10,
            })
            .await
            .context("StopContainer")?;
        runtime
            .remove_container(RemoveContainerRequest {
                container_id: container,
            })
            .await
            .context("RemoveContainer")?;
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .context("StopPodSandbox")?;
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .context("RemovePodSandbox")?;
        let pods = runtime
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items;
        ensure!(pods.is_empty(), "pods left after removal: {pods:?}");
        Ok(())
    }
    .await;
    if let Err(e) = result {
        bail!(
            "{e:#}\n--- containerd log (tail) ---\n{}\n--- node log (tail) ---\n{}",
            tail(&containerd.log(), 60),
            node.child.log_tail(60)
        );
    }

    // Nothing of the pod stays: no shim, no rootfs, shm or other mount under containerd's
    // directories. The image's lazy layers stay mounted until the image is removed.
    wait_for(Duration::from_secs(20), "the pod's shims to exit", || {
        containerd.shim_pids().is_empty()
    })
    .await?;
    let left = mounts_under(containerd.dir());
    ensure!(left.is_empty(), "mounts left by the pod: {left:?}");
    ensure!(
        fuse_mounts(&node.root)? == 2,
        "the image's layers stay mounted"
    );

    containerd.stop();
    drop(node);
    drop(registry);
    let left = mounts_under(&dir);
    ensure!(left.is_empty(), "mounts left after the test: {left:?}");
    Ok(())
}

/// The CRI plugin's config for a host-network pod without CNI: pulls unpack into Shoal's
/// snapshots with the labels that make them lazy, registries come from `certs`, and everything
/// the plugin keeps (runc state, CNI files it looks for) is under `dir`.
fn cri_config(dir: &Path, pause: &str, certs: &Path) -> String {
    let cni = dir.join("cni");
    let runc_root = dir.join("containerd/runc");
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # The sandbox's oom_score_adj of -998 needs CAP_SYS_RESOURCE, which a test machine that is
  # itself a container may lack (runc then fails with "can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "shoal"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        runc_root = runc_root.display(),
        cni_bin = cni.join("bin").display(),
        cni_conf = cni.join("net.d").display(),
        certs = certs.display(),
    )
}

/// A host-network pod (so no CNI is needed), logging under `logs`, as the kubelet configures
/// one.
fn sandbox_config(logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "lazy".into(),
            uid: "3c5e1f1e-0000-4000-8000-000000000001".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        // The kubelet leaves it empty for host-network pods: runc cannot set a hostname
        // without a UTS namespace of the pod's own.
        hostname: String::new(),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node.into(),
                    pid: NamespaceMode::Pod.into(),
                    ipc: NamespaceMode::Pod.into(),
                    ..NamespaceOption::default()
                }),
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        }),
        labels: HashMap::new(),
        ..PodSandboxConfig::default()
    }
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..ImageSpec::default()
    }
}

/// Polls ContainerStatus until the container has exited; returns its exit code.
async fn wait_for_exit(runtime: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = runtime
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .context("ContainerStatus")?
            .into_inner()
            .status
            .context("ContainerStatus without a status")?;
        if status.state == i32::from(ContainerState::ContainerExited) {
            return Ok(status.exit_code);
        }
        ensure!(
            Instant::now() < deadline,
            "container {id} still {:?} after 60s",
            ContainerState::try_from(status.state)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `done` until it holds or `timeout` passes.
async fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The text of a complete stdout line of a CRI log (`<RFC 3339 time> stdout F <text>`).
fn stdout_line(line: &str) -> Option<&str> {
    let mut fields = line.splitn(4, ' ');
    let (_time, stream, tag, text) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    (stream == "stdout" && tag == "F").then_some(text)
}

fn fuse_mounts(root: &Path) -> Result<usize> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let root = root.display().to_string();
    Ok(mounts
        .lines()
        .filter(|l| l.contains(&root) && l.contains("fuse"))
        .count())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A pause image as the sandbox container: busybox sleeping until SIGTERM (PID 1 gets no
/// default signal handling, hence the trap). Plain gzip, not eStargz: unpacked normally.
fn pause_image(dir: &Path, registry: &Registry) -> Result<String> {
    Ok(ImageBuilder::new()
        .busybox()
        .cmd(&[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 3600 & wait $!; done",
        ])
        .build(&dir.join("pause"))?
        .push(&registry.addr(), "test/pause:3.9")?
        .reference)
}

/// busybox plus a layer with the small file the container reads and 48 MiB it does not,
/// converted to eStargz with `shoal convert`. Returns the converted image and the digest of
/// its big layer.
fn lazy_image(dir: &Path, registry: &Registry) -> Result<(String, String)> {
    ImageBuilder::new()
        .busybox()
        .layer([
            ("data/small", format!("{LINE}\n").into_bytes()),
            ("data/big", random_bytes(5, BIG_LAYER)),
        ])
        .compression_level(1)
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/cri:plain")?;
    let converted = format!("{}/test/cri:esgz", registry.addr());
    shoal_integration::shoal::convert(
        dir,
        &registry.addr(),
        &format!("{}/test/cri:plain", registry.addr()),
        &converted,
        &[],
    )?;
    Ok((converted, largest_layer(registry, "test/cri", "esgz")?))
}

/// The digest of the biggest layer of `repo:tag` in the registry.
fn largest_layer(registry: &Registry, repo: &str, tag: &str) -> Result<String> {
    let url = format!("{}/v2/{repo}/manifests/{tag}", registry.url());
    let accept = "application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json";
    let response = http::get(&url, Some(accept), Duration::from_secs(10))?;
    ensure!(response.status == 200, "GET {url}: {}", response.status);
    let manifest: serde_json::Value = serde_json::from_slice(&response.body)?;
    manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .max_by_key(|l| l["size"].as_u64())
        .and_then(|l| l["digest"].as_str())
        .map(String::from)
        .context("no layer digest")
}
