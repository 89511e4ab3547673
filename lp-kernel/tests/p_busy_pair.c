// SPDX-License-Identifier: GPL-2.0
/*
 * All or nothing: two functions, one of them busy (a task sleeps in lp_target_sleeper). The
 * patch is refused as a whole: lp_target_value must not switch either.
 */
#include "livepatch.h"

static int new_value(void)
{
	return 7;
}

static int new_sleeper(void)
{
	return 7;
}

LP_PATCH_MODULE(LP_FUNCS(LP_PATCH_NAMED("lp_target:lp_target_value", new_value),
			 LP_PATCH_NAMED("lp_target:lp_target_sleeper", new_sleeper)),
		LP_NO_SYMBOLS);
