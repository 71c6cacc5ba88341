//! Applying events to records.
//!
//! A [`WorkingSet`] holds the records the engine read and changed since its last checkpoint.
//! Events are applied through a [`Batch`], a view of the working set over a [`RecordSource`]
//! (the store) from which records are loaded the first time they are needed. The aggregate
//! delta is computed by subtracting a record's contribution when it is first changed and adding
//! the contribution of its current state when the delta is taken ([`WorkingSet::take_delta`]):
//! whatever happened to a record in between, the aggregates move from "sum over the old
//! records" to "sum over the new ones". A checkpoint ([`WorkingSet::finish`]) hands back every
//! changed record once, however many events changed it: writes are coalesced.

use std::collections::HashMap;

use crate::aggregate::{contribute, Aggregates};
use crate::event::{Event, EventData, Rejection, Version};
use crate::record::{
    Attribution, CustomerDeal, CustomerRecord, DealRecord, DealState, LeadCreation, LeadRecord,
    Record, RecordKey, SpendLine, SpendRecord,
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
    /// Changed since it was loaded: written at the next checkpoint.
    changed: bool,
    /// Its contribution is withdrawn from the aggregates until the next delta is taken.
    withdrawn: bool,
}

/// The records changed since the last checkpoint and the matching aggregate delta.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// `None` deletes the record.
    pub writes: Vec<(RecordKey, Option<Record>)>,
    pub delta: Aggregates,
}

/// Records loaded and changed since the last checkpoint.
#[derive(Default)]
pub struct WorkingSet {
    slots: HashMap<RecordKey, Slot>,
    /// Keys whose contribution is withdrawn, in the order they were first changed.
    withdrawn: Vec<RecordKey>,
    delta: Aggregates,
    changed: usize,
}

impl WorkingSet {
    pub fn new() -> WorkingSet {
        WorkingSet::default()
    }

    /// A view for applying events, loading missing records from `source`.
    pub fn batch<'a, S: RecordSource>(
        &'a mut self,
        source: &'a S,
        tenants: &'a Tenants,
    ) -> Batch<'a, S> {
        Batch {
            source,
            tenants,
            set: self,
        }
    }

    /// Records changed since the last checkpoint.
    pub fn changed(&self) -> usize {
        self.changed
    }

    /// Records held (changed or only read).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The aggregate delta of everything applied since the last call: the records changed
    /// since then contribute again with their current state.
    pub fn take_delta(&mut self, tenants: &Tenants) -> Aggregates {
        for key in self.withdrawn.drain(..) {
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            slot.withdrawn = false;
            if let Some(record) = slot.record.as_ref().filter(|record| !record.is_empty()) {
                contribute(
                    &key.tenant,
                    record,
                    tenants.get(&key.tenant),
                    1,
                    &mut self.delta,
                );
            }
        }
        std::mem::take(&mut self.delta)
    }

    /// Ends the window: the records to write (or delete), each once, and the delta not yet
    /// taken.
    pub fn finish(mut self, tenants: &Tenants) -> BatchOutput {
        let delta = self.take_delta(tenants);
        let writes = self
            .slots
            .into_iter()
            .filter(|(_, slot)| slot.changed)
            .map(|(key, slot)| (key, slot.record.filter(|record| !record.is_empty())))
            .collect();
        BatchOutput { writes, delta }
    }
}

/// Applies events to a [`WorkingSet`].
pub struct Batch<'a, S: RecordSource> {
    source: &'a S,
    tenants: &'a Tenants,
    set: &'a mut WorkingSet,
}

impl<S: RecordSource> Batch<'_, S> {
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
                ..
            } => {
                let amount = match settings.to_reporting(*amount, currency) {
                    Ok(amount) => amount,
                    Err(rejection) => return Ok(Outcome::Rejected(rejection)),
                };
                let line = event
                    .data
                    .spend_line_key()
                    .expect("a spend.reported has a spend line");
                let key = RecordKey::spend(tenant, &line);
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
        if !self.set.slots.contains_key(key) {
            let record = self.source.load(key)?;
            self.set.slots.insert(
                key.clone(),
                Slot {
                    record,
                    changed: false,
                    withdrawn: false,
                },
            );
        }
        Ok(self.set.slots.get_mut(key).expect("loaded just above"))
    }

    /// The current record, read only.
    fn slot(&mut self, key: &RecordKey) -> Result<Option<&Record>, S::Error> {
        Ok(self.load_slot(key)?.record.as_ref())
    }

    /// The record for a change: the first change since the last delta withdraws its
    /// contribution.
    fn slot_mut(
        &mut self,
        key: &RecordKey,
        empty: impl FnOnce() -> Record,
    ) -> Result<&mut Record, S::Error> {
        let tenants = self.tenants;
        self.load_slot(key)?;
        let set = &mut *self.set;
        let slot = set.slots.get_mut(key).expect("loaded just above");
        if !slot.changed {
            slot.changed = true;
            set.changed += 1;
        }
        if !slot.withdrawn {
            slot.withdrawn = true;
            set.withdrawn.push(key.clone());
            if let Some(record) = slot.record.as_ref().filter(|record| !record.is_empty()) {
                contribute(
                    &key.tenant,
                    record,
                    tenants.get(&key.tenant),
                    -1,
                    &mut set.delta,
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
