//! Orders and the shipment made from each: JSON record values. A shipment
//! is a pure function of its order, so a re-sent shipment has the same
//! content as the first.

use serde::{Deserialize, Serialize};

/// The header naming the order a shipment is for.
pub const ORDER_ID_HEADER: &str = "order-id";

/// An order, as produced to `orders` (keyed by its id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// Unique id.
    pub id: String,
    /// Who ordered.
    pub customer: String,
    /// What.
    pub item: String,
    /// How many.
    pub quantity: u32,
}

/// A shipment, as produced to `shipments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shipment {
    /// The order it ships.
    pub order_id: String,
    /// Where to.
    pub ship_to: String,
    /// What, as `quantity x item`.
    pub contents: String,
}

impl Shipment {
    /// The shipment for `order`.
    pub fn for_order(order: &Order) -> Shipment {
        Shipment {
            order_id: order.id.clone(),
            ship_to: order.customer.clone(),
            contents: format!("{} x {}", order.quantity, order.item),
        }
    }
}

/// The JSON of a value.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("orders and shipments always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shipment_is_made_from_its_order_alone() {
        let order = Order { id: "o1".into(), customer: "ann".into(), item: "lamp".into(), quantity: 2 };
        let shipment = Shipment::for_order(&order);
        assert_eq!(shipment, Shipment { order_id: "o1".into(), ship_to: "ann".into(), contents: "2 x lamp".into() });
        assert_eq!(serde_json::from_slice::<Order>(&encode(&order)).unwrap(), order);
    }
}
