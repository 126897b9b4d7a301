//! One adapted layer's forward pass, shared by LoRA training, pretraining and the merged model.

use flotilla_wire::model::LayerKind;
use tch::Tensor;

/// One layer's forward pass: base weight and bias, plus `scale·B·A` when LoRA factors are given;
/// ReLU, and for a convolution a 2×2 max-pool.
pub(super) fn layer_forward(
    h: &Tensor,
    kind: LayerKind,
    w: &Tensor,
    b: &Tensor,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Tensor {
    match kind {
        LayerKind::Linear => {
            let h = if h.dim() > 2 { h.flatten(1, -1) } else { h.shallow_clone() };
            let out = h.linear(w, Some(b));
            let out = match lora {
                Some((a, bb, scale)) => out + h.matmul(&a.tr()).matmul(&bb.tr()) * scale,
                None => out,
            };
            out.relu()
        }
        LayerKind::Conv { c_in, c_out, kernel } => {
            let pad = (kernel / 2) as i64;
            let out = h.conv2d(w, Some(b), [1, 1], [pad, pad], [1, 1], 1);
            let out = match lora {
                Some((a, bb, scale)) => {
                    let r = a.size()[0];
                    let a4 = a.view([r, c_in as i64, kernel as i64, kernel as i64]);
                    let b4 = bb.view([c_out as i64, r, 1, 1]);
                    let down = h.conv2d(&a4, None::<&Tensor>, [1, 1], [pad, pad], [1, 1], 1);
                    out + down.conv2d(&b4, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1) * scale
                }
                None => out,
            };
            out.relu().max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
        }
    }
}
