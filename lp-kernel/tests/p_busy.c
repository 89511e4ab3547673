// SPDX-License-Identifier: GPL-2.0
/* Scenario "busy": lp_target_sleeper while a kthread sleeps inside it. */
#include "livepatch.h"

static int new_lp_target_sleeper(void)
{
	return 2;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_target:lp_target_sleeper", new_lp_target_sleeper)),
		LP_NO_SYMBOLS);
