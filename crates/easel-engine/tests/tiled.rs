//! Exact tiled evaluation: the loss and pixel gradient computed tile by tile equal the whole
//! image's to float rounding, for every loss plugin, both poolings, odd image sizes and tile
//! sizes that do not divide the image.

mod support;

use candle_core::Device;
use easel_config::ConfigLayers;
use easel_core::LayerId;
use easel_engine::{load_image, StyleRun};
use easel_plugins::builtin;
use easel_vgg::Vgg19;
use support::{data, weights};

/// Agreement asked of tiled and whole evaluations: relative to the loss, to the gradient's
/// norm, and for single entries to the largest entry (small entries are differences of
/// large terms, whose rounding differs between the two orders of summation).
const TOLERANCE: f64 = 1e-5;

/// A run of `size` px with `losses` (TOML `[[loss]]` tables) and `pooling`, from noise so that
/// every loss is away from its minimum; `tile_size` 0 evaluates the image whole.
fn run(losses: &str, pooling: &str, size: u32, tile_size: u32) -> StyleRun {
    let text = format!(
        "[run]\nsize = {size}\niterations = 1\ninit = \"noise\"\n[model]\npooling = \"{pooling}\"\ntile_size = {tile_size}\n{losses}"
    );
    let plan = ConfigLayers::defaults().with_text("test", &text).unwrap().plan(&builtin()).unwrap();
    let limits = plan.limits;
    let content = load_image(&data("content.png"), &limits).unwrap();
    let style = load_image(&data("style.png"), &limits).unwrap();
    let vgg =
        Vgg19::load(weights(), LayerId::Relu5_1, plan.model.pooling, plan.model.preprocess, &Device::Cpu)
            .unwrap();
    StyleRun::new(plan, vgg, content, vec![(style, 1.0)]).unwrap()
}

fn evaluate(run: &StyleRun) -> (f64, Vec<f32>) {
    let (value, grad) = run.objective().total(run.image()).unwrap();
    (value, grad.flatten_all().unwrap().to_vec1().unwrap())
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

fn check(what: &str, losses: &str, pooling: &str, size: u32, tile_sizes: &[u32]) {
    let whole = run(losses, pooling, size, 0);
    assert_eq!(whole.tile_step(), None, "{what}: the whole image fits");
    let (value, grad) = evaluate(&whole);
    assert!(value > 0.0 && norm(&grad) > 0.0, "{what}: a loss away from its minimum");
    let largest = grad.iter().fold(0f64, |m, &g| m.max(f64::from(g).abs()));
    for &tile_size in tile_sizes {
        let tiled = run(losses, pooling, size, tile_size);
        assert_eq!(tiled.tile_step(), Some(tile_size as usize), "{what}");
        assert_eq!(tiled.image().dims(), whole.image().dims(), "{what}");
        let (tiled_value, tiled_grad) = evaluate(&tiled);
        let at = format!("{what}, {pooling} pooling, {size} px, tiles of {tile_size}");
        assert!((tiled_value - value).abs() <= TOLERANCE * value, "{at}: loss {tiled_value} vs {value}");
        let (n, tn) = (norm(&grad), norm(&tiled_grad));
        assert!((tn - n).abs() <= TOLERANCE * n, "{at}: gradient norm {tn} vs {n}");
        let difference: Vec<f32> = grad.iter().zip(&tiled_grad).map(|(a, b)| a - b).collect();
        assert!(norm(&difference) <= TOLERANCE * n, "{at}: gradient differs by {} of {n}", norm(&difference));
        // Entries across the image, tile borders and the last ragged tile included.
        for i in (0..grad.len()).step_by(997).chain([grad.len() - 1]) {
            let (a, b) = (f64::from(grad[i]), f64::from(tiled_grad[i]));
            assert!((a - b).abs() <= TOLERANCE * largest, "{at}: gradient entry {i}: {b} vs {a}");
        }
    }
}

const CONTENT: &str = "[[loss]]\ntype = \"content\"\n";
const GRAM: &str = "[[loss]]\ntype = \"gram\"\nweight = 1e6\n";
const TV: &str = "[[loss]]\ntype = \"tv\"\nweight = 1e-3\n";

#[test]
fn all_losses_together_tiled_equal_whole_with_max_and_avg_pooling() {
    let all = format!("{CONTENT}{GRAM}{TV}");
    // 203 and 187 px (the content image is 4:3): odd sides, not multiples of any tile.
    check("content + gram + tv", &all, "max", 203, &[64, 128]);
    check("content + gram + tv", &all, "avg", 187, &[64, 128]);
}

#[test]
fn each_loss_alone_tiled_equals_whole() {
    for (what, loss) in [("content", CONTENT), ("gram", GRAM), ("tv", TV)] {
        check(what, loss, "max", 201, &[128]);
        check(what, loss, "avg", 201, &[64]);
    }
}

#[test]
fn gram_on_several_layers_with_other_weights_and_a_deep_content_layer() {
    let losses = "[[loss]]\ntype = \"content\"\nlayers = [\"relu2_2\", \"relu5_1\"]\n\
                  [[loss]]\ntype = \"gram\"\nweight = 1e5\nlayers = [\"relu1_2\", \"relu3_3\", \"relu4_1\"]\n\
                  layer_weights = [0.2, 0.3, 0.5]\n";
    check("content on relu2_2 and relu5_1, gram on three", losses, "max", 229, &[64]);
}
