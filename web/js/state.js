// What the page holds: the query being built and the results shown.

export const PAGE = 36;
export const EXAMPLES = ["a dog running on the beach", "sunset over the sea", "a red flower close-up", "snowy mountains", "an old building", "people at a party"];

export const state = {
  text: "",
  upload: null,          // { file, url } of a picture to search by
  similarTo: null,       // { id, thumb } for find-similar
  modifiers: [],         // [{ id, weight, thumb }] from "more / less like this"
  hits: [],
  offset: 0,
  more: false,
  loading: false,
  generation: 0,         // bumps on every new search; stale responses are dropped
  current: -1,           // index of the photo open in the viewer
  sort: "relevance",     // the order of the results shown ("newest", "oldest": grouped by month)
  understood: [],        // filters the server read from the query text, shown as chips
  shown: "",             // the address's query part for the results shown
  typing: false,         // the present history entry came from typing
};
