//! What the device front ends read and record: credentials, presence, session state.

use super::identity::{Credentials, Status};
use super::{common_of, lock, twin_of, IdentityKey, Registry};
use crate::error::HubResult;
use crate::timestamp::Timestamp;
use std::sync::Arc;

impl Registry {
    /// What the device front ends need to authenticate an identity.
    pub fn credentials(&self, key: &IdentityKey) -> HubResult<(Credentials, Status)> {
        self.with_device(&key.device_id, |rec| {
            let status = rec.device.status;
            Ok((common_of(rec, key)?.credentials.clone(), status))
        })
    }

    /// Records a connect or disconnect, and the model id a device announced on connect.
    /// A change of state is reported (a connection state event) once the lock is released.
    pub fn set_connected(&self, key: &IdentityKey, connected: bool, model_id: Option<&str>) {
        let changed = self.with_device(&key.device_id, |rec| {
            if let (Some(model), Ok(twin)) = (model_id, twin_of(rec, key)) {
                twin.model_id = model.to_owned();
            }
            let common = common_of(rec, key)?;
            let now = Timestamp::now();
            let changed = common.presence.connected != connected;
            common.presence.connected = connected;
            common.presence.state_updated = now;
            if connected {
                common.presence.last_activity = now;
            }
            Ok(changed)
        });
        if matches!(changed, Ok(true)) {
            self.report(super::Change::Connection {
                key: key.clone(),
                connected,
            });
        }
    }

    /// Stores an identity's session state (saved with the record when it changes).
    pub fn set_session(&self, key: &IdentityKey, session: u8) {
        let unchanged = self
            .with_device(&key.device_id, |rec| {
                Ok(common_of(rec, key)?.session == session)
            })
            .unwrap_or(true);
        if unchanged {
            return;
        }
        let _ = self.change_device(
            &key.device_id,
            |rec| {
                common_of(rec, key)?.session = session;
                Ok(())
            },
            |()| {},
        );
    }

    /// Every identity with session state, for restoring it at start-up.
    pub fn sessions(&self) -> Vec<(IdentityKey, u8)> {
        let records: Vec<_> = self.devices.iter().map(|e| Arc::clone(e.value())).collect();
        let mut out = Vec::new();
        for r in records {
            let rec = lock(&r);
            let id = &rec.device.device_id;
            if rec.device.common.session != 0 {
                out.push((IdentityKey::device(id.clone()), rec.device.common.session));
            }
            for (m, module) in &rec.modules {
                if module.module.common.session != 0 {
                    out.push((
                        IdentityKey::module(id.clone(), m.clone()),
                        module.module.common.session,
                    ));
                }
            }
        }
        out
    }

    /// Records device activity (a message or request from it).
    pub fn touch(&self, key: &IdentityKey) {
        let _ = self.with_device(&key.device_id, |rec| {
            common_of(rec, key)?.presence.last_activity = Timestamp::now();
            Ok(())
        });
    }
}
