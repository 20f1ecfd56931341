//! The candle `VarBuilder` backend of a [`WeightStore`](super::WeightStore): shape checks naming tensor and
//! file, trainable names as `Var`s (one per name), frozen tensors read once and shared.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;

use super::Inner;

/// The candle backend behind [`WeightStore::var_builder`].
pub(super) struct StoreBackend {
    pub(super) inner: Arc<Inner>,
    /// The store's dtype and device (the ones whose frozen tensors are kept).
    pub(super) dtype: DType,
    pub(super) device: Device,
    pub(super) trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl SimpleBackend for StoreBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let entry = self.inner.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "checkpoint {}: missing tensor `{name}` (the model expects shape {:?})",
                self.inner.dir.display(),
                shape.dims()
            ))
        })?;
        if entry.shape != shape {
            return Err(candle_core::Error::Msg(format!(
                "checkpoint {}: tensor `{name}` has shape {:?}, the model expects {:?}",
                entry.file.display(),
                entry.shape.dims(),
                shape.dims()
            )));
        }
        let trainable = (self.trainable)(name);
        {
            let mut requests = self.inner.requests();
            requests.names.insert(name.to_string());
            let ours = dtype == self.dtype && device.same_device(&self.device);
            if let Some(tensor) = requests.frozen.get(name).filter(|_| ours && !trainable) {
                return Ok(tensor.clone());
            }
            if let Some(var) = requests.vars.get(name).filter(|_| trainable) {
                if var.dtype() == dtype && var.device().same_device(device) {
                    return Ok(var.as_tensor().clone());
                }
                return Err(candle_core::Error::Msg(format!(
                    "tensor `{name}` is trainable and was already handed out as {:?}; asked again as {dtype:?}",
                    var.dtype()
                )));
            }
        }
        // Read outside the lock: other threads may build models from the same store meanwhile.
        let tensor = self
            .inner
            .read(entry, dtype, device)
            .map_err(|err| candle_core::Error::Msg(err.to_string()))?;
        let mut requests = self.inner.requests();
        if !trainable {
            if dtype == self.dtype && device.same_device(&self.device) {
                let kept = requests.frozen.entry(name.to_string()).or_insert(tensor);
                return Ok(kept.clone());
            }
            return Ok(tensor);
        }
        if let Some(var) = requests.vars.get(name) {
            // Another thread made it while this one was reading.
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        requests.vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = match self.inner.entries.get(name) {
            Some(entry) => entry.shape.clone(),
            None => Shape::from(()),
        };
        self.get(shape, name, candle_nn::Init::Const(0.), dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }
}
