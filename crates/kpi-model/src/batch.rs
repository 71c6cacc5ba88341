//! Applying events to records, a batch at a time.
//!
//! A [`Batch`] loads the records an event touches from a [`RecordSource`] (the store), changes
//! them in memory, and at the end hands back the records to write and the aggregate delta.
//! The delta is computed by subtracting a record's contribution the first time the batch
//! changes it and adding the contribution of its final state: whatever the batch did to a
//! record, the aggregates move from "sum over the old records" to "sum over the new ones".
//! Several events on one record within a batch cost one write.

use std::collections::HashMap;

use crate::aggregate::{contribute, Aggregates};
use crate::event::{Event, EventData, Rejection, Version};
use crate::record::{
    Attribution, CustomerDeal, CustomerRecord, DealRecord, DealState, LeadCreation, LeadRecord,
    Record, RecordKey, SpendLine, SpendLineKey, SpendRecord,
};
use crate::settings::Tenants;

/// Where a batch reads the current records from.
pub trait RecordSource {
    type Error;
    fn load(&self, key: &RecordKey) -> Result<Option<Record>, Self::Error>;
}

/// What applying one event did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The event was new for its entity (it may still have changed nothing, as an older
    /// correction that loses to a newer one).
    Applied,
    /// The same `(tenant, id)` was already applied: ignored.
    Duplicate,
    /// The event is valid JSON but cannot be applied (currency without a rate).
    Rejected(Rejection),
}

struct Slot {
    record: Option<Record>,
    dirty: bool,
}

/// The records changed by a batch and the matching aggregate delta.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// `None` deletes the record.
    pub writes: Vec<(RecordKey, Option<Record>)>,
    pub delta: Aggregates,
}

/// A unit of work over the records.
pub struct Batch<'a, S: RecordSource> {
    source: &'a S,
    tenants: &'a Tenants,
    slots: HashMap<RecordKey, Slot>,
    delta: Aggregates,
}

impl<'a, S: RecordSource> Batch<'a, S> {
    pub fn new(source: &'a S, tenants: &'a Tenants) -> Self {
        Batch {
            source,
            tenants,
            slots: HashMap::new(),
            delta: Aggregates::default(),
        }
    }

    /// Applies one valid event.
    pub fn apply(&mut self, event: &Event) -> Result<Outcome, S::Error> {
        let settings = self.tenants.get(&event.tenant);
        let tenant = event.tenant.as_str();
        match &event.data {
            EventData::LeadCreated {
                lead_id,
                channel,
                campaign,
                qualified,
                customer_id,
            } => {
                let key = RecordKey::lead(tenant, lead_id);
                if self.already_applied(&key, &event.id)? {
                    return Ok(Outcome::Duplicate);
                }
                let version = event.version();
                let lead = self.lead_mut(&key)?;
                lead.applied.insert(event.id.clone());
                let attribution_before = lead.attribution();
                if lead.created.as_ref().is_none_or(|c| version > c.version) {
                    lead.created = Some(LeadCreation {
                        version: version.clone(),
                        channel: channel.clone(),
                        campaign: campaign.clone(),
                        customer_id: customer_id.clone(),
                    });
                }
                if let Some(qualified) = qualified {
                    set_qualified(lead, version, *qualified);
                }
                if lead.attribution() != attribution_before {
                    let deals: Vec<String> = lead.won_deals.iter().cloned().collect();
                    for deal_id in deals {
                        self.reattribute(tenant, &deal_id)?;
                    }
                }
            }
            EventData::LeadQualified { lead_id, qualified } => {
                let key = RecordKey::lead(tenant, lead_id);
                if self.already_applied(&key, &event.id)? {
                    return Ok(Outcome::Duplicate);
                }
                let version = event.version();
                let lead = self.lead_mut(&key)?;
                lead.applied.insert(event.id.clone());
                set_qualified(lead, version, *qualified);
            }
            EventData::LeadStageChanged { lead_id, stage } => {
                let key = RecordKey::lead(tenant, lead_id);
                if self.already_applied(&key, &event.id)? {
                    return Ok(Outcome::Duplicate);
                }
                let lead = self.lead_mut(&key)?;
                lead.applied.insert(event.id.clone());
                lead.stages.insert(stage.clone());
            }
            EventData::DealWon {
                deal_id,
                customer_id,
                amount,
                currency,
                lead_id,
                channel,
                campaign,
            } => {
                let amount = match settings.to_reporting(*amount, currency) {
                    Ok(amount) => amount,
                    Err(rejection) => return Ok(Outcome::Rejected(rejection)),
                };
                let state = DealState::Won {
                    customer_id: customer_id.clone(),
                    amount,
                    lead_id: lead_id.clone(),
                    channel: channel.clone(),
                    campaign: campaign.clone(),
                };
                return self.apply_deal(event, deal_id, state);
            }
            EventData::DealLost { deal_id, .. } => {
                return self.apply_deal(event, deal_id, DealState::Lost);
            }
            EventData::SpendReported {
                date,
                amount,
                currency,
                channel,
                campaign,
                category,
                source,
                account,
            } => {
                let amount = match settings.to_reporting(*amount, currency) {
                    Ok(amount) => amount,
                    Err(rejection) => return Ok(Outcome::Rejected(rejection)),
                };
                let key = RecordKey::spend(
                    tenant,
                    &SpendLineKey {
                        source: source.clone(),
                        account: account.clone(),
                        channel: channel.clone(),
                        campaign: campaign.clone(),
                        category: *category,
                        date: *date,
                    },
                );
                if self.already_applied(&key, &event.id)? {
                    return Ok(Outcome::Duplicate);
                }
                let version = event.version();
                let Record::Spend(spend) =
                    self.slot_mut(&key, || Record::Spend(SpendRecord::default()))?
                else {
                    unreachable!("spend keys hold spend records")
                };
                spend.applied.insert(event.id.clone());
                if spend.latest.as_ref().is_none_or(|(v, _)| version > *v) {
                    spend.latest = Some((
                        version,
                        SpendLine {
                            date: *date,
                            amount,
                            channel: channel.clone(),
                            campaign: campaign.clone(),
                        },
                    ));
                }
            }
        }
        Ok(Outcome::Applied)
    }

    fn apply_deal(
        &mut self,
        event: &Event,
        deal_id: &str,
        state: DealState,
    ) -> Result<Outcome, S::Error> {
        let tenant = event.tenant.as_str();
        let key = RecordKey::deal(tenant, deal_id);
        if self.already_applied(&key, &event.id)? {
            return Ok(Outcome::Duplicate);
        }
        let version = event.version();
        let deal = self.deal_mut(&key)?;
        deal.applied.insert(event.id.clone());
        if deal.latest.as_ref().is_some_and(|(v, _)| version <= *v) {
            return Ok(Outcome::Applied);
        }
        let links_before = deal.won_links();
        deal.latest = Some((version.clone(), state));
        let links_after = deal.won_links();
        let own_fields = match &deal.latest {
            Some((
                _,
                DealState::Won {
                    channel, campaign, ..
                },
            )) => Some((channel.clone(), campaign.clone())),
            _ => None,
        };

        let lead_before = links_before.as_ref().and_then(|(_, lead)| lead.clone());
        let lead_after = links_after.as_ref().and_then(|(_, lead)| lead.clone());
        if lead_before != lead_after {
            if let Some(lead_id) = &lead_before {
                self.lead_mut(&RecordKey::lead(tenant, lead_id))?
                    .won_deals
                    .remove(deal_id);
            }
            if let Some(lead_id) = &lead_after {
                self.lead_mut(&RecordKey::lead(tenant, lead_id))?
                    .won_deals
                    .insert(deal_id.to_string());
            }
        }

        let attribution = match &own_fields {
            Some((channel, campaign)) => Some(self.resolve_attribution(
                tenant,
                lead_after.as_deref(),
                channel.as_deref(),
                campaign.as_deref(),
            )?),
            None => None,
        };
        self.deal_mut(&key)?.attribution = attribution.clone();

        let customer_before = links_before.map(|(customer, _)| customer);
        let customer_after = links_after.map(|(customer, _)| customer);
        if let Some(customer_id) = &customer_before {
            if customer_before != customer_after {
                self.customer_mut(&RecordKey::customer(tenant, customer_id))?
                    .deals
                    .remove(deal_id);
            }
        }
        if let (Some(customer_id), Some(attribution)) = (&customer_after, attribution) {
            self.customer_mut(&RecordKey::customer(tenant, customer_id))?
                .deals
                .insert(
                    deal_id.to_string(),
                    CustomerDeal {
                        time: version.time,
                        attribution,
                    },
                );
        }
        Ok(Outcome::Applied)
    }

    /// A deal counts under its lead's channel and campaign when the lead is known, else under
    /// its own.
    fn resolve_attribution(
        &mut self,
        tenant: &str,
        lead_id: Option<&str>,
        channel: Option<&str>,
        campaign: Option<&str>,
    ) -> Result<Attribution, S::Error> {
        if let Some(lead_id) = lead_id {
            if let Some(Record::Lead(lead)) = self.slot(&RecordKey::lead(tenant, lead_id))? {
                if let Some(attribution) = lead.attribution() {
                    return Ok(attribution);
                }
            }
        }
        Ok(Attribution::from_fields(channel, campaign))
    }

    /// Re-resolves a won deal's attribution after its lead changed, and tells its customer.
    fn reattribute(&mut self, tenant: &str, deal_id: &str) -> Result<(), S::Error> {
        let key = RecordKey::deal(tenant, deal_id);
        let Some(Record::Deal(deal)) = self.slot(&key)? else {
            return Ok(());
        };
        let Some((
            version,
            DealState::Won {
                customer_id,
                lead_id,
                channel,
                campaign,
                ..
            },
        )) = deal.latest.clone()
        else {
            return Ok(());
        };
        let current = deal.attribution.clone();
        let attribution = self.resolve_attribution(
            tenant,
            lead_id.as_deref(),
            channel.as_deref(),
            campaign.as_deref(),
        )?;
        if current.as_ref() == Some(&attribution) {
            return Ok(());
        }
        self.deal_mut(&key)?.attribution = Some(attribution.clone());
        self.customer_mut(&RecordKey::customer(tenant, &customer_id))?
            .deals
            .insert(
                deal_id.to_string(),
                CustomerDeal {
                    time: version.time,
                    attribution,
                },
            );
        Ok(())
    }

    fn already_applied(&mut self, key: &RecordKey, event_id: &str) -> Result<bool, S::Error> {
        Ok(self
            .slot(key)?
            .is_some_and(|record| record.has_applied(event_id)))
    }

    fn load_slot(&mut self, key: &RecordKey) -> Result<&mut Slot, S::Error> {
        if !self.slots.contains_key(key) {
            let record = self.source.load(key)?;
            self.slots.insert(
                key.clone(),
                Slot {
                    record,
                    dirty: false,
                },
            );
        }
        Ok(self.slots.get_mut(key).expect("loaded just above"))
    }

    /// The current record, read only.
    fn slot(&mut self, key: &RecordKey) -> Result<Option<&Record>, S::Error> {
        Ok(self.load_slot(key)?.record.as_ref())
    }

    /// The record for a change: the first change in the batch withdraws its contribution.
    fn slot_mut(
        &mut self,
        key: &RecordKey,
        empty: impl FnOnce() -> Record,
    ) -> Result<&mut Record, S::Error> {
        let tenants = self.tenants;
        self.load_slot(key)?;
        let slot = self.slots.get_mut(key).expect("loaded just above");
        if !slot.dirty {
            slot.dirty = true;
            if let Some(record) = &slot.record {
                contribute(
                    &key.tenant,
                    record,
                    tenants.get(&key.tenant),
                    -1,
                    &mut self.delta,
                );
            }
        }
        Ok(slot.record.get_or_insert_with(empty))
    }

    fn lead_mut(&mut self, key: &RecordKey) -> Result<&mut LeadRecord, S::Error> {
        match self.slot_mut(key, || Record::Lead(LeadRecord::default()))? {
            Record::Lead(lead) => Ok(lead),
            _ => unreachable!("lead keys hold lead records"),
        }
    }

    fn deal_mut(&mut self, key: &RecordKey) -> Result<&mut DealRecord, S::Error> {
        match self.slot_mut(key, || Record::Deal(DealRecord::default()))? {
            Record::Deal(deal) => Ok(deal),
            _ => unreachable!("deal keys hold deal records"),
        }
    }

    fn customer_mut(&mut self, key: &RecordKey) -> Result<&mut CustomerRecord, S::Error> {
        match self.slot_mut(key, || Record::Customer(CustomerRecord::default()))? {
            Record::Customer(customer) => Ok(customer),
            _ => unreachable!("customer keys hold customer records"),
        }
    }

    /// Ends the batch: the records to write (or delete) and the aggregate delta.
    pub fn finish(mut self) -> BatchOutput {
        let mut writes = Vec::new();
        for (key, slot) in self.slots {
            if !slot.dirty {
                continue;
            }
            match slot.record {
                Some(record) if !record.is_empty() => {
                    contribute(
                        &key.tenant,
                        &record,
                        self.tenants.get(&key.tenant),
                        1,
                        &mut self.delta,
                    );
                    writes.push((key, Some(record)));
                }
                _ => writes.push((key, None)),
            }
        }
        BatchOutput {
            writes,
            delta: self.delta,
        }
    }
}

fn set_qualified(lead: &mut LeadRecord, version: Version, qualified: bool) {
    if lead.qualified.as_ref().is_none_or(|(v, _)| version > *v) {
        lead.qualified = Some((version, qualified));
    }
}

/// Sums the contributions of all `records` (a rebuild).
pub fn aggregate_records<'r>(
    records: impl IntoIterator<Item = (&'r RecordKey, &'r Record)>,
    tenants: &Tenants,
) -> Aggregates {
    let mut sum = Aggregates::default();
    for (key, record) in records {
        contribute(&key.tenant, record, tenants.get(&key.tenant), 1, &mut sum);
    }
    // Merging into empty aggregates drops zero cells exactly as incremental merges do.
    let mut aggregates = Aggregates::default();
    aggregates.merge(sum);
    aggregates
}
