/* SPDX-License-Identifier: GPL-2.0 */
/* The Rust half of lpcore (lp-kernel/rust): lp-core's redirect table and decisions. */
#ifndef LP_RUST_H
#define LP_RUST_H

#include <linux/types.h>

#define LP_RS_ABI_VERSION 1

/* lp-core's EntryState values. */
enum lp_rs_state { LP_RS_PENDING = 0, LP_RS_ACTIVE = 1, LP_RS_REVERTING = 2 };

/* [start, end) of code that must not be on any task's stack at the switch. */
struct lp_range {
	u64 start;
	u64 end;
};

u32 lp_rs_abi_version(void);
/* Sets up the table over static storage; call once before anything else. */
int lp_rs_init(void);
/* The trap path: where a call to `ip` goes now (0: run the original). Never blocks. */
u64 lp_rs_redirect(u64 ip);
/* Writers (serialised by lp_mutex). Return 0 or -errno; `msg` gets lp-core's one-line reason. */
int lp_rs_push(u64 old, u64 new_fn, u32 patch_id, char *msg, size_t len);
int lp_rs_set_state(u64 old, u32 state, char *msg, size_t len);
/* Takes the top version (patch_id's) out: through Reverting when it is Active. */
int lp_rs_pop(u64 old, u32 patch_id, char *msg, size_t len);
/* Patch id of the top version at `old` (0: no entry). */
u32 lp_rs_top_patch(u64 old);
/* Stacked versions at `old` (0: no entry). */
u32 lp_rs_depth(u64 old);
/*
 * lp-core's consistency verdict for one task: 0 = safe, 1 = busy (then *busy_range is the index
 * of the range and *busy_addr the address found in it).
 */
int lp_rs_check_task(u32 tid, u64 ip, const u64 *return_addresses, size_t n,
		     const struct lp_range *ranges, size_t nranges, size_t *busy_range,
		     u64 *busy_addr);

#endif
