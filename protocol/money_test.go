package protocol

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestParseAndFormatCredits(t *testing.T) {
	for in, want := range map[string]MicroCredits{
		"0": 0, "1": 1_000_000, "0.5": 500_000, "12.000001": 12_000_001, ".25": 250_000, "7.": 7_000_000,
		"9007199254.740992": MaxMicroCredits, "0009": 9_000_000,
	} {
		got, err := ParseCredits(in)
		if err != nil || got != want {
			t.Errorf("ParseCredits(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", ".", "-1", "1.0000001", "1e6", "ten", "9007199254.740993", "99999999999"} {
		if _, err := ParseCredits(bad); err == nil {
			t.Errorf("ParseCredits(%q) succeeded", bad)
		}
	}
	for mc, want := range map[MicroCredits]string{0: "0.000000", 1: "0.000001", 1_500_000: "1.500000", -2_000_001: "-2.000001"} {
		if got := FormatCredits(mc); got != want {
			t.Errorf("FormatCredits(%d) = %q, want %q", mc, got, want)
		}
	}
}

// TestMoneyNames: every amount is written under its name with the unit and
// under its deprecated one, and read from either (an older server's answer,
// an older client's request), so that peers a release apart agree.
func TestMoneyNames(t *testing.T) {
	for _, tc := range []struct {
		name     string
		v        any
		new, old []string // keys the JSON must hold
		oldJSON  string   // the same value as an older server wrote it
		decoded  any      // a pointer to decode oldJSON into
	}{
		{"cost", Cost{MicroCredits: 42, TrainTokens: 7}, []string{`"micro_credits":42`, `"train_tokens":7`}, []string{`"credits":42`},
			`{"credits":42,"train_tokens":7}`, &Cost{}},
		{"run", Run{ID: "r", SpentMicroCredits: 9}, []string{`"spent_micro_credits":9`, `"id":"r"`}, []string{`"spent":9`},
			`{"id":"r","spent":9}`, &Run{}},
		{"charge", Charge{Call: "sample", MicroCredits: 3}, []string{`"micro_credits":3`}, []string{`"credits":3`},
			`{"call":"sample","credits":3}`, &Charge{}},
		{"account", Account{Account: "a", BalanceMicroCredits: 5, SpentMicroCredits: 6}, []string{`"balance_micro_credits":5`, `"spent_micro_credits":6`},
			[]string{`"balance":5`, `"spent":6`}, `{"account":"a","balance":5,"spent":6}`, &Account{}},
		{"credit response", CreditResponse{Account: "a", BalanceMicroCredits: 8}, []string{`"balance_micro_credits":8`}, []string{`"balance":8`},
			`{"account":"a","balance":8}`, &CreditResponse{}},
		{"prices", Prices{TrainMicroCreditsPer1K: 1, PrefillMicroCreditsPer1K: 2, SampleMicroCreditsPer1K: 3, StorageMicroCreditsPerGBHour: 4},
			[]string{`"train_micro_credits_per_1k":1`, `"prefill_micro_credits_per_1k":2`, `"sample_micro_credits_per_1k":3`, `"storage_micro_credits_per_gb_hour":4`},
			[]string{`"train_per_1k":1`, `"prefill_per_1k":2`, `"sample_per_1k":3`, `"storage_per_gb_hour":4`},
			`{"train_per_1k":1,"prefill_per_1k":2,"sample_per_1k":3,"storage_per_gb_hour":4}`, &Prices{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := json.Marshal(tc.v)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range append(tc.new, tc.old...) {
				if !strings.Contains(string(b), k) {
					t.Errorf("%s lacks %s", b, k)
				}
			}
			// Round trip, and an older server's answer, both decode to v.
			for _, in := range []string{string(b), tc.oldJSON} {
				p := reflect.New(reflect.TypeOf(tc.v))
				if err := json.Unmarshal([]byte(in), p.Interface()); err != nil {
					t.Fatal(err)
				}
				if got := p.Elem().Interface(); !reflect.DeepEqual(got, tc.v) {
					t.Errorf("decode %s = %+v, want %+v", in, got, tc.v)
				}
			}
		})
	}
}

func TestRequestedAmount(t *testing.T) {
	for _, tc := range []struct {
		req  CreateKeyRequest
		want MicroCredits
		ok   bool
	}{
		{CreateKeyRequest{MicroCredits: 5}, 5, true},
		{CreateKeyRequest{Credits: 5}, 5, true},
		{CreateKeyRequest{MicroCredits: 5, Credits: 5}, 5, true},
		{CreateKeyRequest{MicroCredits: 5, Credits: 6}, 0, false},
		{CreateKeyRequest{}, 0, true},
	} {
		got, err := tc.req.Requested()
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("%+v: Requested() = %d, %v", tc.req, got, err)
		}
	}
	if got, err := (CreditRequest{Account: "a", Amount: 3}).Requested(); got != 3 || err != nil {
		t.Errorf("credit's old amount: %d, %v", got, err)
	}
}
