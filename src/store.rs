//! Optional persistence (`--data-dir`): the registry's device records in an embedded,
//! crash-safe database (redb).
//!
//! Each device record (identity, modules, twins with versions, etags and metadata, queued
//! cloud-to-device messages) is one value, written in its own transaction committed with
//! redb's default `Immediate` durability before the write is acknowledged to the client. redb
//! commits are atomic and its file survives being killed at any moment, so an acknowledged
//! write is never lost and a torn write never corrupts the store. Policies come from the config
//! file at every start and are not stored; connection state is not stored (everyone is
//! disconnected after a restart).
//!
//! Cost: redb has one writer at a time, so with persistence on, writes to different devices
//! queue for the commit (and its fsync). Persistence is off by default.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

/// device id → JSON of the device record.
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Store-wide facts, such as the format version.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// The format this build writes and reads. A store of another format is refused.
pub const FORMAT: &str = "iothub-emulator-store/1";
const DB_FILE: &str = "hub.redb";

/// A failed store operation, with a message for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(String);

fn err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what}: {e}"))
}

/// The open database.
pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    /// When the directory or file cannot be used, or holds a store of another format.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(&format!("cannot create {}", dir.display()), e))?;
        let path = dir.join(DB_FILE);
        // redb would quietly make a new database in an empty file, and a hub whose data was
        // lost would start as a new, empty one. An empty store file is never what a previous
        // run left (redb writes its header on creation), so say so and stop.
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError(format!(
                "{} is empty (0 bytes), so whatever it held is lost; this is not a store any run of the emulator leaves behind. Remove the file to start an empty hub, or use another --data-dir.",
                path.display()
            )));
        }
        let db = Database::create(&path)
            .map_err(|e| err(&format!("cannot open {}", path.display()), e))?;
        let store = Self { db };
        let txn = store.db.begin_write().map_err(|e| err("store", e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| err("store", e))?;
            let found = meta
                .get("format")
                .map_err(|e| err("store", e))?
                .map(|v| v.value().to_owned());
            match found {
                None => {
                    meta.insert("format", FORMAT).map_err(|e| err("store", e))?;
                }
                Some(f) if f == FORMAT => {}
                Some(f) => {
                    return Err(StoreError(format!(
                        "{} holds a store of format {f:?}; this version reads {FORMAT:?}. Use another --data-dir, or remove it to start empty.",
                        path.display()
                    )))
                }
            }
            txn.open_table(DEVICES).map_err(|e| err("store", e))?;
        }
        txn.commit().map_err(|e| err("store", e))?;
        Ok(store)
    }

    /// Writes one device record durably.
    pub fn save(&self, device_id: &str, record: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| err("store write", e))?;
        {
            let mut table = txn.open_table(DEVICES).map_err(|e| err("store write", e))?;
            table
                .insert(device_id, record)
                .map_err(|e| err("store write", e))?;
        }
        txn.commit().map_err(|e| err("store commit", e))
    }

    /// Removes one device record durably.
    pub fn remove(&self, device_id: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| err("store write", e))?;
        {
            let mut table = txn.open_table(DEVICES).map_err(|e| err("store write", e))?;
            table.remove(device_id).map_err(|e| err("store write", e))?;
        }
        txn.commit().map_err(|e| err("store commit", e))
    }

    /// Removes every device record (hub reset).
    pub fn clear(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| err("store write", e))?;
        {
            let mut table = txn.open_table(DEVICES).map_err(|e| err("store write", e))?;
            table
                .retain(|_, _| false)
                .map_err(|e| err("store write", e))?;
        }
        txn.commit().map_err(|e| err("store commit", e))
    }

    /// Every stored record, as (device id, bytes).
    pub fn load(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| err("store read", e))?;
        let table = txn.open_table(DEVICES).map_err(|e| err("store read", e))?;
        table
            .iter()
            .map_err(|e| err("store read", e))?
            .map(|entry| {
                let (k, v) = entry.map_err(|e| err("store read", e))?;
                Ok((k.value().to_owned(), v.value().to_vec()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_other_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.save("a", b"1").unwrap();
            store.save("b", b"2").unwrap();
            store.remove("a").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), vec![("b".to_owned(), b"2".to_vec())]);
        store.clear().unwrap();
        assert!(store.load().unwrap().is_empty());
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("format", "other/9")
                .unwrap();
            txn.commit().unwrap();
        }
        drop(store);
        let refused = Store::open(dir.path()).unwrap_err();
        assert!(refused.to_string().contains("other/9"), "{refused}");
    }

    #[test]
    fn an_empty_store_file_is_refused_not_taken_for_a_new_hub() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), b"").unwrap();
        let refused = Store::open(dir.path()).unwrap_err();
        assert!(
            refused.to_string().contains("is empty (0 bytes)"),
            "{refused}"
        );
        // Nothing was written over it.
        assert_eq!(
            std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len(),
            0
        );
        // A directory without the file still starts a new store.
        let fresh = tempfile::tempdir().unwrap();
        Store::open(fresh.path()).unwrap();
    }
}
