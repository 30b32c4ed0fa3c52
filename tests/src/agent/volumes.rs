//! Volumes: Secret and ConfigMap projection (items, modes, `optional`) with the kubelet's
//! atomic `..data` swap, emptyDir directories, and each container's mountPath → directory map.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;

use super::Shared;
use super::pod::PodCtx;
use super::validate::is_clean_relative;

/// Files of one volume: relative path → (content, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// Why something the Pod needs is not available yet (retried, reported as waiting).
#[derive(Debug, Clone)]
pub(super) struct Missing(pub(super) String);

fn ns_ref<K: kube::Resource<DynamicType = ()>>(ns: &str, name: &str) -> ObjectRef<K> {
    ObjectRef::new(name).within(ns)
}

fn secret_data(shared: &Shared, ns: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let s = shared.secrets.get(&ns_ref(ns, name))?;
    Some(
        s.data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
    )
}

fn config_map_data(shared: &Shared, ns: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let c = shared.config_maps.get(&ns_ref(ns, name))?;
    let mut out: BTreeMap<String, Vec<u8>> = c
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in c.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    Some(out)
}

/// Projects keys of a Secret/ConfigMap into `files`, honouring items, modes and `optional`.
#[allow(clippy::too_many_arguments)]
fn project_keys(
    files: &mut Files,
    what: &str,
    name: &str,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
) -> Result<(), Missing> {
    let Some(data) = data else {
        if optional {
            return Ok(());
        }
        return Err(Missing(format!("{what} {name:?} not found")));
    };
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => {
                        let mode = item.mode.map_or(default_mode, mode_bits);
                        files.insert(item.path.clone(), (v.clone(), mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(Missing(format!(
                            "{what} {name:?} has no key {:?}",
                            item.key
                        )));
                    }
                }
            }
        }
        _ => {
            for (k, v) in data {
                files.insert(k, (v, default_mode));
            }
        }
    }
    Ok(())
}

fn mode_bits(mode: i32) -> u32 {
    u32::try_from(mode).unwrap_or(0o644) & 0o777
}

/// Default mode of projected files (Kubernetes: 0644).
const DEFAULT_FILE_MODE: u32 = 0o644;

/// Computes the files of a Secret or ConfigMap volume.
fn volume_files(shared: &Shared, pod: &Pod, v: &Volume) -> Result<Files, Missing> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut files = Files::new();
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        project_keys(
            &mut files,
            "secret",
            &name,
            secret_data(shared, ns, &name),
            s.items.as_ref(),
            s.default_mode.map_or(DEFAULT_FILE_MODE, mode_bits),
            s.optional == Some(true),
        )?;
    }
    if let Some(c) = &v.config_map {
        project_keys(
            &mut files,
            "configmap",
            &c.name,
            config_map_data(shared, ns, &c.name),
            c.items.as_ref(),
            c.default_mode.map_or(DEFAULT_FILE_MODE, mode_bits),
            c.optional == Some(true),
        )?;
    }
    Ok(files)
}

/// Writes `files` into `dir` atomically, as the kubelet's AtomicWriter does: the content goes
/// into a fresh `..<n>` directory, the `..data` symlink is swapped to it with one rename, and
/// each top-level entry is a symlink through `..data`. A reader opening `dir/key` sees the
/// old or the new content, never a mix.
fn write_atomic(dir: &Path, files: &Files) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let stamp = format!(
        "..{}_{}",
        Timestamp::now().as_nanosecond(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let data_dir = dir.join(&stamp);
    std::fs::create_dir(&data_dir)?;
    for (rel, (content, mode)) in files {
        if !is_clean_relative(rel) {
            return Err(std::io::Error::other(format!("bad file path {rel:?}")));
        }
        let path = data_dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link)?;
    std::fs::rename(&tmp_link, dir.join("..data"))?;
    let top: BTreeSet<String> = files
        .keys()
        .filter_map(|k| k.split('/').next().map(str::to_owned))
        .collect();
    for name in &top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "..data" || name == stamp {
            continue;
        }
        if name.starts_with("..") {
            let _ = std::fs::remove_dir_all(entry.path());
        } else if !top.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

impl PodCtx {
    pub(super) fn volume_dir(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(name)
    }

    /// Re-projects every non-emptyDir volume; true when something changed on disk.
    pub(super) fn project_volumes(
        &self,
        last: &mut HashMap<String, Files>,
    ) -> Result<bool, Missing> {
        let mut changed = false;
        for v in self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
        {
            let dir = self.volume_dir(&v.name);
            if v.empty_dir.is_some() {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Missing(format!("creating {}: {e}", dir.display())))?;
                continue;
            }
            let files = volume_files(&self.shared, &self.pod, v)?;
            if last.get(&v.name) == Some(&files) {
                continue;
            }
            write_atomic(&dir, &files)
                .map_err(|e| Missing(format!("writing volume {}: {e}", v.name)))?;
            tracing::debug!(pod = %self.name, volume = %v.name, "volume projected");
            last.insert(v.name.clone(), files);
            changed = true;
        }
        Ok(changed)
    }
}

/// Local directories for each mountPath of a container, longest mountPath first.
pub(super) fn container_mounts(dir: &Path, c: &Container) -> Vec<(String, PathBuf)> {
    let mut mounts: Vec<(String, PathBuf)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.mount_path.trim_end_matches('/').to_owned(),
                dir.join("volumes").join(&m.name),
            )
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writer_swaps_data_and_removes_stale_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Files::new();
        files.insert("a".into(), (b"1".to_vec(), 0o600));
        files.insert("sub/b".into(), (b"2".to_vec(), 0o644));
        write_atomic(dir.path(), &files).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read(dir.path().join("sub/b")).unwrap(), b"2");
        let mode = std::fs::metadata(dir.path().join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        files.remove("sub/b");
        files.insert("a".into(), (b"3".to_vec(), 0o600));
        write_atomic(dir.path(), &files).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"3");
        assert!(!dir.path().join("sub").exists());
        let entries: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries.len(), 3, "a, ..data and one ..<stamp>: {entries:?}");
    }
}
