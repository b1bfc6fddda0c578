package main

// The admin's commands on accounts: signal keys create|list|revoke (API
// keys: a new account with credits, the keys by id, a key revoked), signal
// credit (credits for an account).

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/signal-p2p/signal/client"
	"github.com/signal-p2p/signal/protocol"
)

func init() {
	register(newKeysCmd)
	register(newCreditCmd)
}

func newKeysCmd() *cobra.Command {
	keys := &cobra.Command{Use: "keys", Short: "Manage API keys (admin)"}
	var name string
	var amount creditsFlag
	create, _ := adminCmd("create", "Create an API key for a new account with an initial balance", noArgs,
		func(ctx context.Context, c *client.Client, token string, o *conn, out io.Writer, _ []string) error {
			res, err := c.CreateKey(ctx, token, protocol.CreateKeyRequest{MicroCredits: amount.mc, Name: name})
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, res)
			}
			_, err = fmt.Fprintf(out, "api_key %s\naccount %s\nkey_id %s\nbalance %s credits\n", res.APIKey, res.Account, res.KeyID, credits(amount.mc))
			return err
		})
	create.Flags().Var(&amount, "credits", "initial balance in credits, e.g. 100 or 0.5 (1 credit = 1,000,000 micro-credits)")
	create.Flags().StringVar(&name, "name", "", "a label for the key")

	var account string
	list, lo := adminCmd("list", "List the API keys (their ids, never the keys), newest first", noArgs,
		func(ctx context.Context, c *client.Client, token string, o *conn, out io.Writer, _ []string) error {
			ks, err := c.ListKeys(ctx, token, account)
			if err != nil {
				return err
			}
			ks, more := newest(ks, o.limit, func(k protocol.Key) string { return k.CreatedAt })
			if o.json {
				return printJSON(out, protocol.KeyList{Keys: ks})
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "ID\tACCOUNT\tNAME\tCREATED\n")
			for _, k := range ks {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", k.ID, k.Account, dash(k.Name), humanTime(k.CreatedAt))
			}
			moreLine(tw, more, "keys")
			return tw.Flush()
		})
	list.Flags().StringVar(&account, "account", "", "only this account's keys")
	lo.bindLimit(list.Flags(), "keys")

	revoke, _ := adminCmd("revoke KEY_ID", "Revoke an API key (its account and balance stay)", exactArgs(1),
		func(ctx context.Context, c *client.Client, token string, o *conn, out io.Writer, args []string) error {
			k, err := c.RevokeKey(ctx, token, args[0])
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, k)
			}
			_, err = fmt.Fprintf(out, "key %s of account %s revoked\n", k.ID, k.Account)
			return err
		})
	keys.AddCommand(create, list, revoke)
	return keys
}

func newCreditCmd() *cobra.Command {
	var account string
	var amount creditsFlag
	cmd, _ := adminCmd("credit", "Add credits to an account (admin)", noArgs,
		func(ctx context.Context, c *client.Client, token string, o *conn, out io.Writer, _ []string) error {
			if account == "" {
				return usageErrorf("--account is required: the account to credit (signal keys create printed it)")
			}
			if !amount.set || amount.mc <= 0 {
				return usageErrorf("--credits is required and must be above 0")
			}
			res, err := c.Credit(ctx, token, protocol.CreditRequest{Account: account, MicroCredits: amount.mc})
			if err != nil {
				return err
			}
			if o.json {
				return printJSON(out, res)
			}
			_, err = fmt.Fprintf(out, "account %s credited %s credits; balance %s credits\n", res.Account, credits(amount.mc), credits(res.BalanceMicroCredits))
			return err
		})
	cmd.Flags().StringVar(&account, "account", "", "the account to credit")
	cmd.Flags().Var(&amount, "credits", "credits to add, e.g. 100 or 0.5 (1 credit = 1,000,000 micro-credits)")
	return cmd
}

// Positional argument rules whose errors are usage errors naming what the
// command wants (its Use line's arguments).
var noArgs = func(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageErrorf("%s takes no arguments, got %q", cmd.CommandPath(), args)
	}
	return nil
}

// maxArgs wants at most n arguments.
func maxArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > n {
			return usageErrorf("%s takes at most %d argument(s) (%s), got %d", cmd.CommandPath(), n, useArgs(cmd), len(args))
		}
		return nil
	}
}

// exactArgs wants n arguments.
func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageErrorf("%s needs %s, got %d argument(s)", cmd.CommandPath(), useArgs(cmd), len(args))
		}
		return nil
	}
}

// useArgs is the arguments part of a command's Use line.
func useArgs(cmd *cobra.Command) string {
	_, a, _ := strings.Cut(cmd.Use, " ")
	return a
}
