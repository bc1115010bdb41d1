//! Exact tiled evaluation: the loss and pixel gradient computed tile by tile equal the whole
//! image's to float rounding, for every loss plugin, both poolings, odd image sizes and tile
//! sizes that do not divide the image.

mod support;

use easel_config::ConfigLayers;
use easel_engine::{load_image, ModelSpec, StyleRun};
use easel_plugins::builtin;
use support::{data, weights};

/// Agreement asked of tiled and whole evaluations: relative to the loss, to the gradient's
/// norm, to the norm for the difference of the gradients, and for single entries to the
/// largest entry (small entries are differences of large terms, whose rounding differs
/// between the two orders of summation).
const TOLERANCE: f64 = 1e-5;

/// How far apart the gradients may be, relative to the norm, with Winograd convolutions (the
/// default): a window's Winograd tiles that reach into its halo round differently from the
/// whole image's (the values are exact, their last bits not), and where a pre-activation is
/// within that rounding of 0, or two inputs of a max-pooling cell of each other, the gradient
/// passes where it did not (or goes to the other input): those few entries differ by their
/// own size. Direct convolutions (`winograd = "none"`) round the same in a window: those
/// evaluations meet [`TOLERANCE`] entry by entry.
const NEAR_TIES: f64 = 1e-3;

/// A run of `size` px with `losses` (TOML `[[loss]]` tables), `pooling` and `winograd` (or,
/// when it is "candle", candle's ops as a GPU runs them), from noise so that every loss is away
/// from its minimum; `tile_size` 0 evaluates the image whole.
fn run(losses: &str, pooling: &str, winograd: &str, size: u32, tile_size: u32) -> StyleRun {
    let kernels = match winograd {
        "candle" => "backend = \"candle\"".to_string(),
        mode => format!("winograd = \"{mode}\""),
    };
    let text = format!(
        "[run]\nsize = {size}\niterations = 1\ninit = \"noise\"\n\
         [model]\npooling = \"{pooling}\"\n{kernels}\ntile_size = {tile_size}\n{losses}"
    );
    let plan = ConfigLayers::defaults().with_text("test", &text).unwrap().plan(&builtin()).unwrap();
    let limits = plan.limits;
    let content = load_image(&data("content.png"), &limits).unwrap();
    let style = load_image(&data("style.png"), &limits).unwrap();
    let vgg = ModelSpec::of(&plan).load(weights()).unwrap();
    StyleRun::new(plan, vgg, content, vec![(style, 1.0)]).unwrap()
}

fn evaluate(run: &StyleRun) -> (f64, Vec<f32>) {
    let (value, grad) = run.objective().total(run.image()).unwrap();
    (value, grad.flatten_all().unwrap().to_vec1().unwrap())
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

fn check(what: &str, losses: &str, (pooling, winograd): (&str, &str), size: u32, tile_sizes: &[u32]) {
    let whole = run(losses, pooling, winograd, size, 0);
    assert_eq!(whole.tile_step(), None, "{what}: the whole image fits");
    let (value, grad) = evaluate(&whole);
    assert!(value > 0.0 && norm(&grad) > 0.0, "{what}: a loss away from its minimum");
    let largest = grad.iter().fold(0f64, |m, &g| m.max(f64::from(g).abs()));
    // candle's convolutions, like the direct ones, round the same in a window.
    let strict = winograd == "none" || winograd == "candle";
    for &tile_size in tile_sizes {
        let tiled = run(losses, pooling, winograd, size, tile_size);
        assert_eq!(tiled.tile_step(), Some(tile_size as usize), "{what}");
        assert_eq!(tiled.image().dims(), whole.image().dims(), "{what}");
        let (tiled_value, tiled_grad) = evaluate(&tiled);
        let at = format!("{what}, {pooling} pooling, winograd {winograd}, {size} px, tiles of {tile_size}");
        assert!((tiled_value - value).abs() <= TOLERANCE * value, "{at}: loss {tiled_value} vs {value}");
        let (n, tn) = (norm(&grad), norm(&tiled_grad));
        assert!((tn - n).abs() <= TOLERANCE * n, "{at}: gradient norm {tn} vs {n}");
        let difference: Vec<f32> = grad.iter().zip(&tiled_grad).map(|(a, b)| a - b).collect();
        let (worst, _) =
            difference
                .iter()
                .enumerate()
                .fold((0, 0f32), |m, (i, d)| if d.abs() > m.1 { (i, d.abs()) } else { m });
        let (_, _, h, w) = whole.image().dims4().unwrap();
        let (c, y, x) = (worst / (h * w), worst / w % h, worst % w);
        let bound = if strict { TOLERANCE } else { NEAR_TIES };
        assert!(
            norm(&difference) <= bound * n,
            "{at}: gradient differs by {} of {n}, most at channel {c} row {y} column {x} of {h}x{w}",
            norm(&difference)
        );
        if strict {
            // Entries across the image, tile borders and the last ragged tile included.
            for i in (0..grad.len()).step_by(997).chain([grad.len() - 1]) {
                let (a, b) = (f64::from(grad[i]), f64::from(tiled_grad[i]));
                assert!((a - b).abs() <= TOLERANCE * largest, "{at}: gradient entry {i}: {b} vs {a}");
            }
        }
    }
}

const CONTENT: &str = "[[loss]]\ntype = \"content\"\n";
const GRAM: &str = "[[loss]]\ntype = \"gram\"\nweight = 1e6\n";
const TV: &str = "[[loss]]\ntype = \"tv\"\nweight = 1e-3\n";
const MAX_DIRECT: (&str, &str) = ("max", "none");
const AVG_DIRECT: (&str, &str) = ("avg", "none");
/// candle's ops, the generic backend a GPU runs.
const MAX_CANDLE: (&str, &str) = ("max", "candle");
/// The defaults.
const MAX: (&str, &str) = ("max", "deep");
const AVG: (&str, &str) = ("avg", "deep");

#[test]
fn all_losses_together_tiled_equal_whole_with_max_and_avg_pooling() {
    let all = format!("{CONTENT}{GRAM}{TV}");
    // 203 and 187 px (the content image is 4:3): odd sides, not multiples of any tile.
    check("content + gram + tv", &all, MAX_DIRECT, 203, &[64, 128]);
    check("content + gram + tv", &all, AVG_DIRECT, 187, &[64, 128]);
    check("content + gram + tv", &all, MAX, 203, &[64]);
    check("content + gram + tv", &all, AVG, 187, &[128]);
    check("content + gram + tv", &all, MAX_CANDLE, 203, &[64]);
}

#[test]
fn each_loss_alone_tiled_equals_whole() {
    for (what, loss) in [("content", CONTENT), ("gram", GRAM), ("tv", TV)] {
        check(what, loss, MAX_DIRECT, 201, &[128]);
        check(what, loss, AVG_DIRECT, 201, &[64]);
    }
}

#[test]
fn gram_statistics_summed_over_several_forward_tiles() {
    // At 421 px the forward-only passes (the statistics, the style image's Gram matrices)
    // have several tiles of their own too, larger than the evaluation's.
    check("gram", GRAM, MAX_DIRECT, 421, &[64]);
    check("gram", GRAM, AVG_DIRECT, 421, &[64]);
    check("gram", GRAM, MAX, 421, &[64]);
}

#[test]
fn gram_on_several_layers_with_other_weights_and_a_deep_content_layer() {
    let losses = "[[loss]]\ntype = \"content\"\nlayers = [\"relu2_2\", \"relu5_1\"]\n\
                  [[loss]]\ntype = \"gram\"\nweight = 1e5\nlayers = [\"relu1_2\", \"relu3_3\", \"relu4_1\"]\n\
                  layer_weights = [0.2, 0.3, 0.5]\n";
    check("content on relu2_2 and relu5_1, gram on three", losses, MAX_DIRECT, 229, &[64]);
}
