//! Factors that stay exactly as a task sent them while the others train (`Trainable::BOnly`: every
//! LoRA A). They are put back after every optimizer step, so the trained factors always see them as
//! sent and they come out bit for bit the same, whatever the optimizer's state does.

use tch::Tensor;

use super::ModelError;

pub(crate) struct FrozenFactors(Vec<(Tensor, Tensor)>);

impl FrozenFactors {
    /// Nothing frozen.
    pub(crate) fn none() -> FrozenFactors {
        FrozenFactors(Vec::new())
    }

    /// `factors` (variables), frozen at their values now.
    pub(crate) fn of<'a>(factors: impl IntoIterator<Item = &'a Tensor>) -> Result<FrozenFactors, ModelError> {
        let kept = factors
            .into_iter()
            .map(|factor| Ok((factor.shallow_clone(), crate::tensor::try_copy(&factor.f_detach()?)?)))
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(FrozenFactors(kept))
    }

    /// Puts every frozen factor back to its value (after an optimizer step).
    pub(crate) fn restore(&self) -> Result<(), ModelError> {
        tch::no_grad(|| {
            for (factor, value) in &self.0 {
                let mut factor = factor.shallow_clone();
                factor.f_copy_(value)?;
            }
            Ok(())
        })
    }
}
