//! Every example in storage-config/ parses, and a node started on it stores
//! and reads back an instance.

use huren::config::StorageConfig;

use crate::support::{self, Backend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_configuration_works() {
    let dir = support::repo_path("storage-config");
    let mut tried = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let parsed =
            StorageConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let work = tempfile::tempdir().unwrap();
        let (backend, storage) = match parsed {
            StorageConfig::Local { .. } => (
                Backend::SqliteLocal,
                // The example's root is an operator's path; keep the test in
                // its own directory.
                StorageConfig::Local {
                    root: Some(work.path().join("blobs")),
                },
            ),
            StorageConfig::S3 {
                ref region,
                ref secret_access_key_file,
                ..
            } => {
                // The example names a site's server and credentials: keep
                // its backend, point it at the test Garage.
                assert!(!region.is_empty());
                assert!(secret_access_key_file.is_some(), "secrets come from files");
                (Backend::SqliteLocal, support::s3_storage(work.path()))
            }
        };
        let mut config = support::test_config(backend, work.path()).await;
        config.storage = storage;
        let node = support::start_node(config, work).await;
        let sample = &support::samples()[0];
        support::pynetdicom_send(&node, std::slice::from_ref(&sample.path)).await;
        support::assert_stored(&node.ingest, &sample.path, &sample.sop_instance_uid).await;
        node.stop().await;
        tried.push(path.file_name().unwrap().to_string_lossy().to_string());
    }
    tried.sort();
    assert!(tried.contains(&"local.toml".to_string()), "{tried:?}");
    assert!(tried.iter().any(|t| t.starts_with("s3")), "{tried:?}");
}
