package main

// signal keys create: mint an API key with credits through the admin API.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/protocol"
)

func init() { register(newKeysCmd) }

func newKeysCmd() *cobra.Command {
	keys := &cobra.Command{Use: "keys", Short: "Manage API keys (admin)"}
	var url, token, name string
	var credits int64
	var asJSON bool
	create := &cobra.Command{
		Use:   "create",
		Short: "Create an API key for a new account with an initial balance",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			warnSecretFlags(cmd, map[string]string{"admin-token": "SIGNAL_ADMIN_TOKEN"})
			if token == "" {
				token = os.Getenv("SIGNAL_ADMIN_TOKEN")
			}
			if url == "" {
				url = os.Getenv("SIGNAL_URL")
			}
			if url == "" || token == "" {
				return fmt.Errorf("--coordinator and --admin-token (or $SIGNAL_URL, $SIGNAL_ADMIN_TOKEN) are required")
			}
			// --credits is in credits; the API takes micro-credits.
			micro := credits * 1_000_000
			if credits < 0 || micro/1_000_000 != credits {
				return fmt.Errorf("--credits %d: out of range", credits)
			}
			var out protocol.CreateKeyResponse
			if err := postJSON(cmd.Context(), strings.TrimRight(url, "/")+"/v1/admin/keys", token, protocol.CreateKeyRequest{Credits: micro, Name: name}, &out); err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(out)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "api_key %s\naccount %s\n", out.APIKey, out.Account)
			return nil
		},
	}
	f := create.Flags()
	f.StringVar(&url, "coordinator", "", "coordinator URL (default $SIGNAL_URL)")
	f.StringVar(&token, "admin-token", "", "admin token (default $SIGNAL_ADMIN_TOKEN)")
	f.Int64Var(&credits, "credits", 0, "initial balance in credits (1 credit = 1,000,000 micro-credits)")
	f.StringVar(&name, "name", "", "a label for the key")
	f.BoolVar(&asJSON, "json", false, "print the API's JSON")
	keys.AddCommand(create)
	return keys
}

// postJSON POSTs v with a bearer token and decodes a 2xx answer into out;
// an error answer becomes an error carrying the API's message.
func postJSON(ctx context.Context, url, token string, v, out any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("post %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var e protocol.ErrorResponse
		_ = json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("post %s: %d %s: %s", url, resp.StatusCode, e.Error.Code, e.Error.Message)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}
