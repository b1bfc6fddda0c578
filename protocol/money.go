package protocol

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// Money on the wire. Every amount is an integer of micro-credits in a field
// whose name says so (micro_credits, balance_micro_credits, ...). The names
// before that (credits, balance, spent, amount, train_per_1k, ...) held the
// same micro-credits; until v0.3 servers answer both names and read either,
// and the SDKs read either, so that a client and a server one release apart
// still agree. The marshalers below are that compatibility, in one place.

// MicroPerCredit is how many micro-credits make one credit.
const MicroPerCredit = 1_000_000

// MaxMicroCredits is the largest amount a request may carry: 2^53, so that
// amounts stay exact in JSON clients that hold numbers as doubles.
const MaxMicroCredits MicroCredits = 1 << 53

// FormatCredits writes micro-credits as a decimal number of credits,
// exactly ("12.500000"): what tables and messages show beside the integer
// amounts the API carries.
func FormatCredits(mc MicroCredits) string {
	sign := ""
	u := uint64(mc)
	if mc < 0 {
		sign, u = "-", uint64(-mc)
	}
	return fmt.Sprintf("%s%d.%06d", sign, u/MicroPerCredit, u%MicroPerCredit)
}

// ParseCredits reads a decimal number of credits ("12", "0.5",
// "1000000.000001") as micro-credits, exactly: no float rounding, at most
// six decimals, no sign, at most MaxMicroCredits.
func ParseCredits(s string) (MicroCredits, error) {
	whole, frac, _ := strings.Cut(strings.TrimSpace(s), ".")
	if whole == "" && frac == "" || len(frac) > 6 || !digits(whole) || !digits(frac) {
		return 0, fmt.Errorf("credits %q: want a non-negative decimal number of credits with at most 6 decimals, e.g. 12.5", s)
	}
	over := fmt.Errorf("credits %q: over the limit of %s credits", s, FormatCredits(MaxMicroCredits))
	if len(strings.TrimLeft(whole, "0")) > 10 {
		return 0, over
	}
	var mc int64
	for _, c := range whole {
		mc = mc*10 + int64(c-'0')
	}
	mc *= MicroPerCredit
	scale := int64(MicroPerCredit / 10)
	for _, c := range frac {
		mc += int64(c-'0') * scale
		scale /= 10
	}
	if mc > MaxMicroCredits {
		return 0, over
	}
	return mc, nil
}

func digits(s string) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// either is the amount a reader takes from a new name and its deprecated
// one: the new one when present.
func either(cur, old *MicroCredits) MicroCredits {
	switch {
	case cur != nil:
		return *cur
	case old != nil:
		return *old
	}
	return 0
}

// MarshalJSON writes micro_credits and its deprecated name credits. It is
// written by hand: a charge's answer is built on every billed call.
func (c Cost) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, 112)
	b = append(b, `{"micro_credits":`...)
	b = strconv.AppendInt(b, c.MicroCredits, 10)
	b = append(b, `,"credits":`...)
	b = strconv.AppendInt(b, c.MicroCredits, 10)
	for _, f := range [...]struct {
		name string
		v    int64
	}{{"train_tokens", c.TrainTokens}, {"prefill_tokens", c.PrefillTokens}, {"sampled_tokens", c.SampledTokens}} {
		if f.v != 0 {
			b = append(b, `,"`...)
			b = append(b, f.name...)
			b = append(b, `":`...)
			b = strconv.AppendInt(b, f.v, 10)
		}
	}
	return append(b, '}'), nil
}

// UnmarshalJSON reads micro_credits, or credits from an older server.
func (c *Cost) UnmarshalJSON(data []byte) error {
	var v struct {
		MicroCredits  *MicroCredits `json:"micro_credits"`
		Credits       *MicroCredits `json:"credits"`
		TrainTokens   int64         `json:"train_tokens"`
		PrefillTokens int64         `json:"prefill_tokens"`
		SampledTokens int64         `json:"sampled_tokens"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	*c = Cost{MicroCredits: either(v.MicroCredits, v.Credits), TrainTokens: v.TrainTokens, PrefillTokens: v.PrefillTokens, SampledTokens: v.SampledTokens}
	return nil
}

// MarshalJSON writes spent_micro_credits and its deprecated name spent.
func (r Run) MarshalJSON() ([]byte, error) {
	type plain Run
	return json.Marshal(struct {
		plain
		Spent MicroCredits `json:"spent"`
	}{plain(r), r.SpentMicroCredits})
}

// UnmarshalJSON reads spent_micro_credits, or spent from an older server.
func (r *Run) UnmarshalJSON(data []byte) error {
	type plain Run
	var v struct {
		plain
		Cur   *MicroCredits `json:"spent_micro_credits"`
		Spent *MicroCredits `json:"spent"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	*r = Run(v.plain)
	r.SpentMicroCredits = either(v.Cur, v.Spent)
	return nil
}

// MarshalJSON writes micro_credits and its deprecated name credits.
func (c Charge) MarshalJSON() ([]byte, error) {
	type plain Charge
	return json.Marshal(struct {
		plain
		Credits MicroCredits `json:"credits"`
	}{plain(c), c.MicroCredits})
}

// UnmarshalJSON reads micro_credits, or credits from an older server.
func (c *Charge) UnmarshalJSON(data []byte) error {
	type plain Charge
	var v struct {
		plain
		Cur     *MicroCredits `json:"micro_credits"`
		Credits *MicroCredits `json:"credits"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	*c = Charge(v.plain)
	c.MicroCredits = either(v.Cur, v.Credits)
	return nil
}

// MarshalJSON writes the amounts under their names and the deprecated
// balance and spent.
func (a Account) MarshalJSON() ([]byte, error) {
	type plain Account
	return json.Marshal(struct {
		plain
		Balance MicroCredits `json:"balance"`
		Spent   MicroCredits `json:"spent"`
	}{plain(a), a.BalanceMicroCredits, a.SpentMicroCredits})
}

// UnmarshalJSON reads either name of each amount.
func (a *Account) UnmarshalJSON(data []byte) error {
	type plain Account
	var v struct {
		plain
		CurBalance *MicroCredits `json:"balance_micro_credits"`
		CurSpent   *MicroCredits `json:"spent_micro_credits"`
		Balance    *MicroCredits `json:"balance"`
		Spent      *MicroCredits `json:"spent"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	*a = Account(v.plain)
	a.BalanceMicroCredits, a.SpentMicroCredits = either(v.CurBalance, v.Balance), either(v.CurSpent, v.Spent)
	return nil
}

// MarshalJSON writes balance_micro_credits and its deprecated name balance.
func (c CreditResponse) MarshalJSON() ([]byte, error) {
	type plain CreditResponse
	return json.Marshal(struct {
		plain
		Balance MicroCredits `json:"balance"`
	}{plain(c), c.BalanceMicroCredits})
}

// UnmarshalJSON reads balance_micro_credits, or balance from an older server.
func (c *CreditResponse) UnmarshalJSON(data []byte) error {
	type plain CreditResponse
	var v struct {
		plain
		Cur     *MicroCredits `json:"balance_micro_credits"`
		Balance *MicroCredits `json:"balance"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	*c = CreditResponse(v.plain)
	c.BalanceMicroCredits = either(v.Cur, v.Balance)
	return nil
}

// pricesOld are Prices' deprecated names.
type pricesOld struct {
	TrainPer1K       *MicroCredits `json:"train_per_1k,omitempty"`
	PrefillPer1K     *MicroCredits `json:"prefill_per_1k,omitempty"`
	SamplePer1K      *MicroCredits `json:"sample_per_1k,omitempty"`
	StoragePerGBHour *MicroCredits `json:"storage_per_gb_hour,omitempty"`
}

// MarshalJSON writes each price under its name and its deprecated one.
func (p Prices) MarshalJSON() ([]byte, error) {
	type plain Prices
	return json.Marshal(struct {
		plain
		pricesOld
	}{plain(p), pricesOld{&p.TrainMicroCreditsPer1K, &p.PrefillMicroCreditsPer1K, &p.SampleMicroCreditsPer1K, &p.StorageMicroCreditsPerGBHour}})
}

// UnmarshalJSON reads either name of each price (a coordinator's models
// file may still use the old ones).
func (p *Prices) UnmarshalJSON(data []byte) error {
	var v struct {
		Train   *MicroCredits `json:"train_micro_credits_per_1k"`
		Prefill *MicroCredits `json:"prefill_micro_credits_per_1k"`
		Sample  *MicroCredits `json:"sample_micro_credits_per_1k"`
		Storage *MicroCredits `json:"storage_micro_credits_per_gb_hour"`
		pricesOld
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return err
	}
	*p = Prices{
		TrainMicroCreditsPer1K:       either(v.Train, v.TrainPer1K),
		PrefillMicroCreditsPer1K:     either(v.Prefill, v.PrefillPer1K),
		SampleMicroCreditsPer1K:      either(v.Sample, v.SamplePer1K),
		StorageMicroCreditsPerGBHour: either(v.Storage, v.StoragePerGBHour),
	}
	return nil
}

// requested is the micro-credits a request carries under the new name or
// the deprecated one; both set must agree.
func requested(field, oldField string, cur, old MicroCredits) (MicroCredits, error) {
	if cur != 0 && old != 0 && cur != old {
		return 0, fmt.Errorf("%s %d and %s %d disagree: send %s alone (%s is its deprecated name)", field, cur, oldField, old, field, oldField)
	}
	if cur != 0 {
		return cur, nil
	}
	return old, nil
}

// Requested is the micro-credits the request funds the account with, from
// either name.
func (r CreateKeyRequest) Requested() (MicroCredits, error) {
	return requested("micro_credits", "credits", r.MicroCredits, r.Credits)
}

// Requested is the micro-credits the request adds, from either name.
func (r CreditRequest) Requested() (MicroCredits, error) {
	return requested("micro_credits", "amount", r.MicroCredits, r.Amount)
}
