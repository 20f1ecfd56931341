//! The shapes set: 84 x 84 RGB scenes of coloured circles, squares and triangles on a 3 x 3 grid (one shape
//! per cell at most, so they never overlap; size and place inside the cell vary), each with its exact
//! annotation, and questions over them whose answers are numbers: counts with colour and shape filters,
//! sums and differences of counts, counts per row. A "list the shapes" question is the hallucination probe,
//! checked by the grounding verifier against the annotation.
//!
//! Every question has a templated reasoning trace (the SFT target): the scene summarised (shapes per colour,
//! per kind), then the counting the question needs, then the boxed answer, e.g.
//! `<think>red: 1, blue: 1. circles: 1, triangles: 1. red: 1, blue: 1, 1+1=2.</think>\boxed{2}`.

use image::{Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::Rng;

/// Side of a scene in pixels (three 28-px cells: one vision token each in the demo policy).
pub const IMAGE_SIZE: u32 = 84;
const CELL: u32 = 28;
const ROWS: [&str; 3] = ["top", "middle", "bottom"];

/// A shape kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    fn plural(self) -> String {
        format!("{}s", self.name())
    }

    /// Whether the pixel offset (dx, dy) from the centre is inside a shape of half-size `r`.
    fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // Apex up: the half-width grows from 0 at the top to r at the base.
            Shape::Triangle => dy.abs() <= r && dx.abs() <= (dy + r) / 2.0,
        }
    }
}

/// A fill colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
}

impl Colour {
    pub const ALL: [Colour; 3] = [Colour::Red, Colour::Green, Colour::Blue];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
        }
    }

    fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [210, 45, 45],
            Colour::Green => [40, 160, 60],
            Colour::Blue => [45, 80, 215],
        }
    }
}

/// One shape in a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Item {
    pub row: usize,
    pub col: usize,
    pub shape: Shape,
    pub colour: Colour,
    /// Half the shape's size in pixels.
    half: f32,
    /// Centre offset from the cell's centre.
    offset: (f32, f32),
}

impl Item {
    /// The cell's index in reading order (0-8).
    pub fn cell(&self) -> usize {
        self.row * 3 + self.col
    }
}

/// A scene: its shapes in reading order (row by row, left to right).
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub items: Vec<Item>,
}

impl Scene {
    /// 2 to 5 shapes in distinct random cells, random kind, colour, size (12-22 px) and place in the cell.
    pub fn random(rng: &mut impl Rng) -> Scene {
        let count = rng.gen_range(2..=5);
        let mut cells: Vec<usize> = (0..9).collect();
        cells.shuffle(rng);
        let mut cells = cells[..count].to_vec();
        cells.sort_unstable();
        let items = cells
            .into_iter()
            .map(|cell| {
                let half = rng.gen_range(6.0f32..=11.0);
                let slack = (CELL as f32 / 2.0 - half - 1.0).max(0.0);
                Item {
                    row: cell / 3,
                    col: cell % 3,
                    shape: *Shape::ALL.choose(rng).unwrap_or(&Shape::Circle),
                    colour: *Colour::ALL.choose(rng).unwrap_or(&Colour::Red),
                    half,
                    offset: (rng.gen_range(-slack..=slack), rng.gen_range(-slack..=slack)),
                }
            })
            .collect();
        Scene { items }
    }

    /// The picture: a light background with per-pixel noise, the shapes filled in their colours.
    pub fn render(&self, rng: &mut impl Rng) -> RgbImage {
        RgbImage::from_fn(IMAGE_SIZE, IMAGE_SIZE, |x, y| {
            let item = self.items.iter().find(|item| {
                let cx = (item.col as u32 * CELL + CELL / 2) as f32 + item.offset.0;
                let cy = (item.row as u32 * CELL + CELL / 2) as f32 + item.offset.1;
                item.shape
                    .contains(x as f32 + 0.5 - cx, y as f32 + 0.5 - cy, item.half)
            });
            let base = item.map_or([235, 235, 230], |item| item.colour.rgb());
            Rgb(base.map(|c| (c as i32 + rng.gen_range(-12..=12)).clamp(0, 255) as u8))
        })
    }

    fn count(&self, keep: impl Fn(&Item) -> bool) -> usize {
        self.items.iter().filter(|item| keep(item)).count()
    }

    /// The scene summarised by colour and by shape, the kinds present only (counts, not places: a small
    /// model reads them off the pooled image; an absent kind is not named, so a grounded description makes
    /// no false claim): `red: 2, blue: 1. circles: 1, squares: 2.`
    pub fn description(&self) -> String {
        let colours: Vec<String> = Colour::ALL
            .iter()
            .map(|&c| (c.name(), self.count(|i| i.colour == c)))
            .filter(|&(_, n)| n > 0)
            .map(|(name, n)| format!("{name}: {n}"))
            .collect();
        let shapes: Vec<String> = Shape::ALL
            .iter()
            .map(|&s| (s.plural(), self.count(|i| i.shape == s)))
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name}: {n}"))
            .collect();
        format!("{}. {}.", colours.join(", "), shapes.join(", "))
    }

    /// The grounding annotation: `{"objects": [...], "attributes": {shape: [colours]}}`.
    pub fn annotation(&self) -> serde_json::Value {
        let mut attributes = std::collections::BTreeMap::<&str, Vec<&str>>::new();
        for item in &self.items {
            let colours = attributes.entry(item.shape.name()).or_default();
            if !colours.contains(&item.colour.name()) {
                colours.push(item.colour.name());
            }
        }
        let objects: Vec<&str> = attributes.keys().copied().collect();
        serde_json::json!({"objects": objects, "attributes": attributes})
    }

    /// "List the shapes" answer: `red circle, blue square, green triangle` (reading order).
    pub fn listing(&self) -> String {
        self.items
            .iter()
            .map(|item| format!("{} {}", item.colour.name(), item.shape.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A question about a scene with a number for an answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Question {
    Colour(Colour),
    Shape(Shape),
    ColourShape(Colour, Shape),
    Total,
    /// Shapes of either colour.
    Sum(Colour, Colour),
    /// How many more of the first kind than of the second (drawn so that it is not negative).
    Difference(Shape, Shape),
    Row(usize),
}

impl Question {
    /// A random question whose answer is defined for `scene`.
    pub fn random(scene: &Scene, rng: &mut impl Rng) -> Question {
        let colour = |rng: &mut dyn rand::RngCore| *Colour::ALL.choose(rng).unwrap_or(&Colour::Red);
        let shape = |rng: &mut dyn rand::RngCore| *Shape::ALL.choose(rng).unwrap_or(&Shape::Circle);
        match rng.gen_range(0..7) {
            0 => Question::Colour(colour(rng)),
            1 => Question::Shape(shape(rng)),
            2 => Question::ColourShape(colour(rng), shape(rng)),
            3 => Question::Total,
            4 => {
                let mut two = Colour::ALL;
                two.shuffle(rng);
                Question::Sum(two[0], two[1])
            }
            5 => {
                let mut two = Shape::ALL;
                two.shuffle(rng);
                let (a, b) = (two[0], two[1]);
                if scene.count(|i| i.shape == a) >= scene.count(|i| i.shape == b) {
                    Question::Difference(a, b)
                } else {
                    Question::Difference(b, a)
                }
            }
            _ => Question::Row(rng.gen_range(0..3)),
        }
    }

    /// The kind, for per-kind accuracy (`meta.kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Question::Colour(_) => "colour",
            Question::Shape(_) => "shape",
            Question::ColourShape(..) => "colour_shape",
            Question::Total => "total",
            Question::Sum(..) => "sum",
            Question::Difference(..) => "difference",
            Question::Row(_) => "row",
        }
    }

    pub fn text(&self) -> String {
        let ask = match self {
            Question::Colour(c) => format!("How many {} shapes are there?", c.name()),
            Question::Shape(s) => format!("How many {} are there?", s.plural()),
            Question::ColourShape(c, s) => {
                format!("How many {} {} are there?", c.name(), s.plural())
            }
            Question::Total => "How many shapes are there?".to_string(),
            Question::Sum(a, b) => {
                format!("How many shapes are {} or {}?", a.name(), b.name())
            }
            Question::Difference(a, b) => {
                format!(
                    "How many more {} than {} are there?",
                    a.plural(),
                    b.plural()
                )
            }
            Question::Row(r) => format!("How many shapes are in the {} row?", ROWS[*r]),
        };
        format!("{ask} Think, then give the number in \\boxed{{}}.")
    }

    /// The reference answer.
    pub fn answer(&self, scene: &Scene) -> usize {
        match *self {
            Question::Colour(c) => scene.count(|i| i.colour == c),
            Question::Shape(s) => scene.count(|i| i.shape == s),
            Question::ColourShape(c, s) => scene.count(|i| i.colour == c && i.shape == s),
            Question::Total => scene.items.len(),
            Question::Sum(a, b) => scene.count(|i| i.colour == a || i.colour == b),
            Question::Difference(a, b) => {
                scene.count(|i| i.shape == a) - scene.count(|i| i.shape == b)
            }
            Question::Row(r) => scene.count(|i| i.row == r),
        }
    }

    /// The worked response: the scene read row by row, the counting, the boxed answer.
    pub fn trace(&self, scene: &Scene) -> String {
        let answer = self.answer(scene);
        let work = match *self {
            Question::Colour(c) => format!("{}: {answer}.", c.name()),
            Question::Shape(s) => format!("{}: {answer}.", s.plural()),
            Question::ColourShape(c, s) => format!("{} {}: {answer}.", c.name(), s.plural()),
            Question::Total => format!("shapes: {answer}."),
            Question::Sum(a, b) => {
                let (x, y) = (
                    scene.count(|i| i.colour == a),
                    scene.count(|i| i.colour == b),
                );
                format!("{}: {x}, {}: {y}, {x}+{y}={answer}.", a.name(), b.name())
            }
            Question::Difference(a, b) => {
                let (x, y) = (scene.count(|i| i.shape == a), scene.count(|i| i.shape == b));
                format!(
                    "{}: {x}, {}: {y}, {x}-{y}={answer}.",
                    a.plural(),
                    b.plural()
                )
            }
            Question::Row(r) => format!("{} row: {answer}.", ROWS[r]),
        };
        format!(
            "<think>{} {work}</think>\\boxed{{{answer}}}",
            scene.description()
        )
    }
}

/// The probe question (hallucination): answered by the listing, judged by the grounding verifier.
pub const LIST_QUESTION: &str = "List the shapes you see, with their colours.";

/// The worked response to [`LIST_QUESTION`].
pub fn list_trace(scene: &Scene) -> String {
    format!(
        "<think>{}</think>\\boxed{{{}}}",
        scene.description(),
        scene.listing()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn scene() -> Scene {
        let item = |row, col, shape, colour| Item {
            row,
            col,
            shape,
            colour,
            half: 8.0,
            offset: (0.0, 0.0),
        };
        Scene {
            items: vec![
                item(0, 0, Shape::Circle, Colour::Red),
                item(0, 2, Shape::Square, Colour::Blue),
                item(2, 1, Shape::Circle, Colour::Red),
                item(2, 2, Shape::Triangle, Colour::Green),
            ],
        }
    }

    #[test]
    fn answers_and_traces_agree_with_the_scene() {
        let s = scene();
        assert_eq!(Question::Colour(Colour::Red).answer(&s), 2);
        assert_eq!(Question::Shape(Shape::Triangle).answer(&s), 1);
        assert_eq!(
            Question::ColourShape(Colour::Red, Shape::Circle).answer(&s),
            2
        );
        assert_eq!(Question::Total.answer(&s), 4);
        assert_eq!(Question::Sum(Colour::Blue, Colour::Green).answer(&s), 2);
        assert_eq!(
            Question::Difference(Shape::Circle, Shape::Square).answer(&s),
            1
        );
        assert_eq!(Question::Row(1).answer(&s), 0);
        assert_eq!(
            Question::Sum(Colour::Red, Colour::Blue).trace(&s),
            "<think>red: 2, green: 1, blue: 1. circles: 2, squares: 1, triangles: 1. \
             red: 2, blue: 1, 2+1=3.</think>\\boxed{3}"
        );
        assert_eq!(
            s.annotation(),
            serde_json::json!({"objects": ["circle", "square", "triangle"],
                "attributes": {"circle": ["red"], "square": ["blue"], "triangle": ["green"]}})
        );
    }

    #[test]
    fn rendered_scenes_show_each_shape_in_its_colour_and_cell() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..20 {
            let s = Scene::random(&mut rng);
            assert!((2..=5).contains(&s.items.len()));
            let image = s.render(&mut rng);
            for item in &s.items {
                // The cell's centre area is mostly the shape's colour.
                let (cx, cy) = (
                    (item.col as u32 * CELL + CELL / 2) as f32 + item.offset.0,
                    (item.row as u32 * CELL + CELL / 2) as f32 + item.offset.1,
                );
                let pixel = image.get_pixel(cx as u32, (cy + 2.0) as u32).0;
                let want = item.colour.rgb();
                let close = pixel
                    .iter()
                    .zip(want)
                    .all(|(&p, w)| (p as i32 - w as i32).abs() <= 12);
                assert!(close, "{item:?}: {pixel:?} vs {want:?}");
            }
            let q = Question::random(&s, &mut rng);
            assert!(q
                .trace(&s)
                .ends_with(&format!("\\boxed{{{}}}", q.answer(&s))));
        }
    }
}
